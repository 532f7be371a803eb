"""Generate the raw responses behind ``tests/fixtures/labelled/responses.jsonl``.

Greedy decoding, 48 new tokens, batch size 8, on CPU in float32, from the two embedded
models: 240 prompts for ``qwen2.5-coder-0.5b`` and 80 for ``smollm2-135m`` (disjoint prompt
sets), each 60% harmful (DoNotAnswer, all 5 risk areas, and HarmBench) and 40% ``neutral``.
Prompts are drawn with :func:`torsion.data.sample` (stratified by category, seeded).

The output is the *unlabelled* scratch file (one row per response: id, model, source,
category, prompt, response). Labels were added by hand afterwards; see the fixture README.

The fixture was generated with ``torsion.data`` at commit 91ca8e1 (176 shipped neutral
prompts). The neutral set has grown since, so a fresh draw now picks some different neutral
prompts; ``--prompts-from`` regenerates exactly the fixture's (model, prompt) pairs instead.

Usage::

    .venv/bin/python scripts/make_labelled_set.py [--out /tmp/labelled_raw.jsonl]
    .venv/bin/python scripts/make_labelled_set.py --prompts-from tests/fixtures/labelled/responses.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from torsion.data import Prompt, load_source, make_prompt, sample
from torsion.generate import GenerationSettings, generate_batch
from torsion.models import load_model

# model spec -> {source: n prompts}; seed used for that model's draw
PLAN = {
    "embedded:qwen2.5-coder-0.5b": ({"donotanswer": 96, "harmbench": 48, "neutral": 96}, 0),
    "embedded:smollm2-135m": ({"donotanswer": 32, "harmbench": 16, "neutral": 32}, 1),
}
SETTINGS = GenerationSettings(max_new_tokens=48, temperature=0.0, batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/labelled_raw.jsonl"))
    parser.add_argument("--prompts-from", type=Path, default=None,
                        help="a JSONL file with model, prompt, category, source: use its prompts, not a draw")
    args = parser.parse_args()
    torch.manual_seed(0)
    fixed: dict[str, list[Prompt]] | None = None
    if args.prompts_from:
        fixed = {}
        for line in args.prompts_from.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                fixed.setdefault(row["model"], []).append(make_prompt(row["prompt"], row["category"], row["source"]))

    pools = {source: load_source(source) for source in ("donotanswer", "harmbench", "neutral")}
    used: set[str] = set()  # prompt hashes already given to a model: the two sets are disjoint
    done = set()
    if args.out.exists():
        done = {(r["model"], r["id"]) for r in map(json.loads, args.out.read_text().splitlines()) if r}

    for spec, (counts, seed) in PLAN.items():
        model_name = spec.split(":", 1)[1]
        chosen = []
        for source, n in counts.items():
            pool = [p for p in pools[source] if p.prompt_hash not in used]
            picked = sample(pool, n, seed=seed)
            used.update(p.prompt_hash for p in picked)
            chosen.extend(picked)
        if fixed is not None:
            chosen = fixed.get(model_name, [])
        pending = [p for p in chosen if (model_name, p.id) not in done]
        print(f"{spec}: {len(chosen)} prompts, {len(pending)} to generate", flush=True)
        if not pending:
            continue
        lm = load_model(spec)
        lengths = {p.id: len(lm.tokenizer(p.prompt)["input_ids"]) for p in pending}
        pending.sort(key=lambda p: lengths[p.id])  # shortest first: less padding
        start = time.time()
        for i in range(0, len(pending), SETTINGS.batch_size):
            batch = pending[i:i + SETTINGS.batch_size]
            responses = generate_batch(lm, [p.prompt for p in batch], SETTINGS)
            with args.out.open("a", encoding="utf-8") as f:
                for p, r in zip(batch, responses):
                    f.write(json.dumps({"id": p.id, "model": model_name, "source": p.source,
                                        "category": p.category, "prompt": p.prompt, "response": r},
                                       ensure_ascii=False) + "\n")
            print(f"  {i + len(batch)}/{len(pending)}  {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
