"""Conditional steering (CAST) on a finished run: held-out refusal rates, targeted category vs the rest.

The condition (``torsion condition fit``: a direction and threshold fit on the run's train rows) fires
on a prompt when its unsteered ``last`` resid state at the condition's block, as captured by the run,
passes the threshold: exactly what ``torsion serve`` tests on its unsteered prefill. A conditionally
steered prompt therefore answers as the steered model where the condition fires and as the unsteered
model elsewhere (greedy generation gives each row the tokens it gets alone). The script generates the
steered arm once on the held-out harmful prompts, takes the unsteered arm from the run's own responses,
and writes ``RUN_DIR/analysis/condition_<category>.json``: refusal and genuine-compliance rates (Wilson
95% intervals) for the targeted category and for the others, unsteered, conditional and unconditional.

    python scripts/condition_eval.py runs/quick --category harmbench --study comply-global
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torsion.behaviour import correct_rows, evaluate_behaviour
from torsion.capture import load_activations
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge.correction import genuine_rate, refusal_rate
from torsion.models import load_model
from torsion.runs import labelled_prompts, run_judge
from torsion.serve.condition import fit_condition
from torsion.steering import get_method
from torsion.store import RunDir, atomic_write_json, read_json
from torsion.vectors import load_vector


def _rates(rows: list) -> dict:
    return {"refused": refusal_rate(rows), "genuine_strong_comply": genuine_rate(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--category", required=True, help="the category whose refusals the steering removes")
    parser.add_argument("--study", default="comply-global", help="the strength search whose chosen alpha and blocks steer")
    args = parser.parse_args(argv)

    run = RunDir(args.run_dir)
    search_path = run.root / "analysis" / f"optimize_{args.study}.json"
    if not search_path.is_file():
        raise TorsionError(f"{search_path} does not exist; run `torsion optimize {run.root} --objective comply` "
                           "first, or name another study with --study")
    search = read_json(search_path)
    alpha, layers = search["alpha"], search["layers"]
    condition = fit_condition(run, args.category)
    prompts, responses = labelled_prompts(run)
    held = [i for i, p in enumerate(prompts) if p.split == "holdout"]
    resid, _ = load_activations(run.activations_path)
    fires = condition.fires(resid["resid"][held, condition.layer])

    manifest = run.manifest()
    lm = load_model(manifest["model"]["spec"])
    vector = load_vector(run.vectors_path, "md/resid", d_model=lm.d_model)
    method = get_method("flat", vectors=vector.directions, layers=layers, component="resid", positions="last")
    settings = GenerationSettings(max_new_tokens=manifest["config"]["max_new_tokens"])
    texts = [prompts[i].prompt for i in held]
    steered = evaluate_behaviour(lm, texts, lambda: method.apply(lm, alpha), settings, judge=run_judge(run),
                                 desc="steered holdout")
    base_rows = correct_rows(texts, [responses[i]["response"] for i in held], [responses[i]["label"] for i in held])
    steered_rows = correct_rows(texts, steered["responses"], steered["labels"])
    arms = {"unsteered": base_rows, "unconditional": steered_rows,
            "conditional": [s if fire else b for s, b, fire in zip(steered_rows, base_rows, fires)]}
    inside = [k for k, i in enumerate(held) if prompts[i].category == args.category]
    outside = [k for k, i in enumerate(held) if prompts[i].category != args.category]
    result = {
        "analysis": "conditional steering (CAST), held-out harmful prompts",
        "condition": {"category": condition.category, "layer": condition.layer, "threshold": condition.threshold,
                      **{k: condition.meta[k] for k in ("train_balanced_accuracy", "heldout_balanced_accuracy")}},
        "steering": {"method": "flat", "vector": "md/resid", "alpha": alpha, "layers": layers, "study": args.study},
        "fired": {"targeted": sum(fires[k] for k in inside), "others": sum(fires[k] for k in outside),
                  "n_targeted": len(inside), "n_others": len(outside)},
        "arms": {name: {"targeted": _rates([rows[k] for k in inside]), "others": _rates([rows[k] for k in outside])}
                 for name, rows in arms.items()},
        "conventions": {"layer_indexing": "block", "refusal_rate": "refused / judged", "intervals": "Wilson 95%"},
    }
    out = run.root / "analysis" / f"condition_{args.category}.json"
    atomic_write_json(out, result)
    print(out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TorsionError as error:
        print(f"condition_eval: error: {error}", file=sys.stderr)
        sys.exit(2)
