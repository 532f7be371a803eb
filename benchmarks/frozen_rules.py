"""Earlier rule judges, loaded from git history so that ``bench_judge.py`` measures them beside the
current one in the same run.

``frozen_rule_judge(commit)`` reads ``src/torsion/judge/patterns.py`` and ``rules.py`` as they were
at ``commit`` (``git show``), writes them into a temporary package (``rules.py``'s import of
``torsion.judge.patterns`` pointed at the old patterns beside it; ``torsion.judge.base`` stays the
installed one) and returns that module's ``RuleJudge``. Without git or the commit it stops with one
line.

Example::

    RuleJudgeV2 = frozen_rule_judge(FROZEN["rules-v2"])
    RuleJudgeV2().name   # "rules-v2"
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FROZEN = {  # each judge's last commit (rules.py and patterns.py unchanged until the next version)
    "rules-v2": "71b320ec7a08870102160cf3749fd39c305e0dee",
    "rules-v3": "fbf874a73abb40892aacc4f096e5f93454ae0fdd",
    "rules-v4": "e98162b0b27b7fcb8898cdd24ba67a46e2340a28",
    "rules-v5": "e09186297dc5fe276c8da4a5d3c387f49bcf80b5",
    "rules-v6": "d0adce8bb30adb0de8f8677858b24e7980e8e079",
}
_TMP: list[tempfile.TemporaryDirectory] = []  # kept alive for the process


def _show(commit: str, path: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], check=True, capture_output=True,
                              text=True).stdout
    except FileNotFoundError:
        raise SystemExit("bench_judge: git is not installed; the frozen rule judges are read from git history") from None
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"bench_judge: cannot read {path} at commit {commit[:12]} "
                         f"({error.stderr.strip().splitlines()[-1] if error.stderr.strip() else 'git failed'}); "
                         "run from a full clone of the torsion repository") from None


def frozen_rule_judge(commit: str) -> type:
    """``RuleJudge`` of ``torsion.judge.rules`` (with its ``patterns``) at ``commit``."""
    rules = _show(commit, "src/torsion/judge/rules.py")
    patterns = _show(commit, "src/torsion/judge/patterns.py")
    if "from torsion.judge.patterns import" not in rules:
        raise SystemExit(f"bench_judge: rules.py at {commit[:12]} does not import torsion.judge.patterns; "
                         "update frozen_rules.py for that layout")
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory(prefix="torsion-frozen-rules-"))
        sys.path.insert(0, _TMP[0].name)
    package = Path(_TMP[0].name) / f"frozen_rules_{commit[:12]}"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(f'"""torsion.judge rules and patterns at {commit}."""\n')
    (package / "patterns.py").write_text(patterns)
    (package / "rules.py").write_text(rules.replace("from torsion.judge.patterns import", "from .patterns import"))
    return importlib.import_module(f"{package.name}.rules").RuleJudge
