"""Reading a run directory's labelled prompts: the one place that decides which rows enter a fit.

Example::

    prompts, responses = labelled_prompts(RunDir("runs/quick"))
    rows = fit_rows(prompts, responses)          # train split, refused or complied
"""

from __future__ import annotations

from torsion.data import Prompt, read_prompts_jsonl
from torsion.errors import TorsionError
from torsion.judge.base import is_complied, is_refused
from torsion.store import RunDir


def labelled_prompts(run: RunDir) -> tuple[list[Prompt], list[dict]]:
    """Prompts and their judged responses, in ``prompts.jsonl`` order."""
    prompts = read_prompts_jsonl(run.prompts_path)
    by_id = {row["id"]: row for row in run.responses()}
    missing = [p.id for p in prompts if p.id not in by_id]
    if missing:
        raise TorsionError(f"{len(missing)} prompts of {run.root} have no response yet (e.g. {missing[0]}); "
                           "finish the run with `torsion run` on the same directory")
    return prompts, [by_id[p.id] for p in prompts]


def fit_rows(prompts: list[Prompt], responses: list[dict]) -> list[int]:
    """Indices of train-split rows labelled refused or complied (degenerate and judge errors never fit)."""
    return [i for i, (p, r) in enumerate(zip(prompts, responses))
            if p.split == "train" and (is_refused(r["score"]) or is_complied(r["score"]))]
