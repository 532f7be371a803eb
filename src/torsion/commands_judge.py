"""What ``torsion judge`` does: label a file, compare two labellings, re-judge a run, retrain.

The parser is in :mod:`torsion.cli_services`; heavy imports happen inside, so ``torsion --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torsion.errors import TorsionError


def judge(args: argparse.Namespace) -> int:
    import json

    from torsion.judge import get_judge, judge_rows
    from torsion.store import append_jsonl, numbered_jsonl

    if args.input not in ("agree", "rejudge", "train") and args.files:
        raise TorsionError(f"torsion judge takes one input file, got {1 + len(args.files)}; judge each file "
                           "separately, or compare two with `torsion judge agree A.jsonl B.jsonl`")
    if args.input == "agree":
        from torsion.judge.agreement import agree_files, format_agreement

        if len(args.files) != 2:
            raise TorsionError("`torsion judge agree` needs two files: torsion judge agree A.jsonl B.jsonl")
        print(format_agreement(agree_files(*args.files)))
        return 0
    if args.input == "train":
        return _judge_train(args)
    options = {}
    if args.judge in ("learned", "ensemble", "probe") and args.weights is not None:
        options["weights"] = args.weights
    if args.judge == "probe":
        options["device"] = args.device
    if args.input == "rejudge":
        from torsion.judge import rejudge_run

        if len(args.files) != 1 or args.judge == "llm":
            raise TorsionError("`torsion judge rejudge` takes one run directory and an offline judge: "
                               "torsion judge rejudge RUN_DIR --judge rules|learned|ensemble|probe")
        print(json.dumps(rejudge_run(args.files[0], get_judge(args.judge, **options))))
        return 0
    if args.out is None:
        raise TorsionError("torsion judge needs --out OUT.jsonl")
    if args.judge == "llm":
        options = {"model": args.llm_model, "base_url": args.base_url, "api_key_env": args.api_key_env,
                   "samples": args.samples, "temperature": args.temperature, "max_workers": args.max_workers,
                   "cache_path": args.cache or args.out.with_suffix(".judge-cache.sqlite")}
        options = {k: v for k, v in options.items() if v is not None}
    judge = get_judge(args.judge, **options)
    numbered = _read_rows(Path(args.input))
    rows = [row for _, row in numbered]
    done = set(_row_ids(args.out, numbered_jsonl(args.out)))
    pending = [row for row, key in zip(rows, _row_ids(Path(args.input), numbered)) if key not in done]
    batch: list[dict] = []
    for judged in judge_rows(pending, judge):
        batch.append(judged)
        if len(batch) == 64:  # whole batches land at once; a killed run keeps what it judged
            append_jsonl(args.out, batch)
            batch = []
    append_jsonl(args.out, batch)
    print(f"{len(pending)} judged ({len(rows) - len(pending)} already in {args.out}) -> {args.out}",
          file=sys.stderr)
    print(json.dumps({"judge": judge.name, "out": str(args.out)}))
    return 0


def _judge_train(args: argparse.Namespace) -> int:
    import json

    from torsion.judge import learned, probe

    if len(args.files) != 1:
        raise TorsionError("`torsion judge train` takes one labelled JSONL file: torsion judge train LABELLED.jsonl "
                           "[--judge learned|probe] [--out MODEL.json]")
    if args.judge not in ("learned", "ensemble", "probe"):
        raise TorsionError(f"`torsion judge train` retrains the learned or the probe judge, not {args.judge!r}; "
                           "pass --judge learned or --judge probe")
    if args.judge == "probe":
        out = args.out or Path(__file__).parent / "judge" / "data" / probe.SHIPPED
        model = probe.train_probe_file(args.files[0], out, device=args.device, exclude_sources=args.exclude_source)
        features = len(model["mean"]) + len(model["rule_features"])
    else:  # learned (the ensemble's learned half)
        out = args.out or Path(__file__).parent / "judge" / "data" / learned.SHIPPED
        model = learned.train_file(args.files[0], out, exclude_sources=args.exclude_source)
        features = len(model["features"])
    print(json.dumps({"out": str(out), "rows": model["training"]["rows"], "sha256": model["training"]["sha256"],
                      "features": features, "classes": model["classes"]}))
    return 0


def _row_ids(path: Path, rows: list[tuple[int, dict]]) -> list[object]:
    """Each row's ``id`` (a string or whole number), or its 0-based position when it has none."""
    ids = []
    for position, (number, row) in enumerate(rows):
        key = row.get("id", position)
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TorsionError(f"{path} line {number} has an 'id' that is not a string or whole number; fix that row")
        ids.append(key)
    return ids


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a user's JSONL file, its last line read even without a newline."""
    from torsion.store import numbered_jsonl

    if not path.is_file():
        raise TorsionError(f"{path} does not exist; pass a JSONL file with 'prompt' and 'response' fields")
    return numbered_jsonl(path, fix="fix or remove that line", last_line=True)
