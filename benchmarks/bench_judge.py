"""Judge accuracy by leave-one-source-out, and judge speed on 2,000 responses.

Rows: ``tests/fixtures/labelled/responses.jsonl`` (hand labels, ``source`` = generation condition).
Views, hand label against judge label (``torsion.judge.views``):

- **binary**: stances refuse / comply / degenerate must match (a row where one side alone says
  degenerate is a disagreement), as ``tests/test_judge_labelled.py`` asserts;
- **four_class**: the five labels (four classes and degenerate);
- **three_class**: full compliance / full refusal / partial refusal on the rows the hand label gives
  a stance (a judge's degenerate there is wrong).

Each judge is scored on every row with its label for that row coming from a judge that never saw
the row's source: the rule judges are fixed (``rules-v2`` to ``rules-v6`` are read from git history
by ``frozen_rules.py``, at the commits recorded as ``frozen_rule_judges``), and each learned candidate and
ensemble threshold is refitted once per source on all other sources (leave-one-source-out; one fit per source
and candidate serves the candidate and the ensembles built on it, and the candidates run in parallel worker
processes). ``per_source`` gives the binary accuracy per held-out source; ``held_out_sources`` the figures on the sources listed in
``tests/fixtures/labelled/splits.json``, which the rules were not written from, and
``held_out_per_source`` each of them alone (binary, four- and three-class).

The probe judge (:mod:`torsion.judge.probe`): every row is read once by the embedded reader at each of
``PROBE_LAYERS`` (cached under ``~/.cache/torsion/bench``), and each (layer, rule weight) candidate is refitted
per source on all other sources. The candidate with the best binary accuracy on the development sources alone is
``probe.chosen_by_development_sources``; the shipped probe's options are ``probe.shipped_options``.

Speed: 2,000 responses (the fixture's, repeated) labelled by each judge; target under 10 s for the
rules and the learned judge (shipped weights); ``rules-v2`` is the baseline in the same run. The probe judge
is timed on ``N_PROBE_SPEED`` responses on the CPU and its 2,000-response time extrapolated (no target: it
runs a 135M-parameter model over every response).
Writes ``benchmarks/results/judge.json``. Run: ``python benchmarks/bench_judge.py`` (about 20 minutes on 2
CPU cores, most of it the probe).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from common import write_result
from frozen_rules import FROZEN, frozen_rule_judge

from torsion.judge.learned import EnsembleJudge, LearnedJudge, fit, rule_terms
from torsion.judge.probe import DEFAULT_OPTIONS as PROBE_DEFAULTS, READER, ProbeJudge, fit_probe, read_layers
from torsion.judge.rules import RuleJudge
from torsion.judge.views import stance, three_class
from torsion.models import load_model

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "labelled"
CANDIDATES = {  # learned-judge options compared by grouped cross-validation
    "words": {"rules": False, "chars": False, "C": 4.0},
    "words+rules": {"rules": True, "chars": False, "C": 4.0},
    "words+rules C=1": {"rules": True, "chars": False, "C": 1.0},
    "words+rules C=16": {"rules": True, "chars": False, "C": 16.0},
}  # char n-grams ("chars": True) added nothing at three times the cost (labelled set v2); not rerun
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PROBE_LAYERS = (14, 17, 20, 23)  # blocks of the 30-block reader compared by grouped cross-validation
PROBE_RULE_WEIGHTS = (1.0, 3.0, 10.0)
N_PROBE_SPEED = 200  # the probe is timed on this many responses; its 2,000-response time is extrapolated
N_SPEED = 2000
TARGET_S = 10.0


def scores(rows: Sequence[dict], predicted: Sequence[str]) -> dict:
    """Binary, four-class and three-class accuracy of ``predicted`` against the hand labels."""
    hand = [r["label"] for r in rows]
    three = [(three_class(h), three_class(p)) for h, p in zip(hand, predicted) if three_class(h)]
    return {"n": len(rows),
            "binary": round(sum(stance(h) == stance(p) for h, p in zip(hand, predicted)) / len(rows), 4),
            "four_class": round(sum(h == p for h, p in zip(hand, predicted)) / len(rows), 4),
            "three_class": round(sum(h == p for h, p in three) / len(three), 4)}


def report(rows: Sequence[dict], predicted: Sequence[str], held_out: set[str]) -> dict:
    per_source = {}
    for source in sorted({r["source"] for r in rows}):
        pairs = [(r, p) for r, p in zip(rows, predicted) if r["source"] == source]
        per_source[source] = scores([r for r, _ in pairs], [p for _, p in pairs])["binary"]
    held = [(r, p) for r, p in zip(rows, predicted) if r["source"] in held_out]
    held_each = {}
    for source in sorted(held_out):
        pairs = [(r, p) for r, p in zip(rows, predicted) if r["source"] == source]
        held_each[source] = scores([r for r, _ in pairs], [p for _, p in pairs])
    return {"all": scores(rows, predicted), "mean_per_source_binary": round(sum(per_source.values()) / len(per_source), 4),
            "min_per_source_binary": min(per_source.values()), "per_source_binary": per_source,
            "held_out_sources": scores([r for r, _ in held], [p for _, p in held]), "held_out_per_source": held_each}


def candidate_predictions(job: tuple[dict, Sequence[dict]]) -> tuple[list[str], dict[float, list[str]], float]:
    """Leave-one-source-out labels of one learned candidate (``options``) and of the ensemble built on it at
    every threshold, from one fit per source; and the seconds it took. One candidate per worker process."""
    options, rows = job
    start = time.perf_counter()
    learned: list[str | None] = [None] * len(rows)
    ensemble: dict[float, list[str | None]] = {t: [None] * len(rows) for t in THRESHOLDS}
    for source in sorted({r["source"] for r in rows}):
        test = [i for i, r in enumerate(rows) if r["source"] == source]
        trained = fit([r for r in rows if r["source"] != source], options)
        prompts, responses = [rows[i]["prompt"] for i in test], [rows[i]["response"] for i in test]
        for i, verdict in zip(test, LearnedJudge(trained=trained).judge(prompts, responses)):
            learned[i] = verdict.label
        for threshold in THRESHOLDS:
            verdicts = EnsembleJudge(threshold=threshold, trained=trained).judge(prompts, responses)
            for i, verdict in zip(test, verdicts):
                ensemble[threshold][i] = verdict.label
    return learned, ensemble, round(time.perf_counter() - start, 1)  # type: ignore[return-value]


def probe_readings(lm, rows: Sequence[dict]) -> np.ndarray:
    """``[n, len(PROBE_LAYERS), d]`` reader features of every row, cached under ``~/.cache/torsion/bench`` by
    the rows' hash, the reader's weights and the token options (reading them takes minutes on a CPU)."""
    from safetensors.numpy import load_file, save_file

    key = hashlib.sha256(json.dumps([[r["prompt"], r["response"]] for r in rows]).encode()).hexdigest()[:16]
    tokens = (PROBE_DEFAULTS["prompt_tokens"], PROBE_DEFAULTS["response_tokens"])
    path = (Path.home() / ".cache" / "torsion" / "bench" /
            f"probe-{key}-{str(lm.weights_sha256)[:12]}-{tokens[0]}-{tokens[1]}-{'-'.join(map(str, PROBE_LAYERS))}"
            ".safetensors")
    if path.is_file():
        return load_file(str(path))["features"]
    features = read_layers(lm, [r["prompt"] for r in rows], [r["response"] for r in rows], PROBE_DEFAULTS,
                           PROBE_LAYERS, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return features


def probe_predictions(job: tuple) -> tuple[str, list[str]]:
    """Leave-one-source-out labels of one probe candidate (layer column, rule weight), from cached features."""
    name, column, weight, rows, features, terms, reader = job
    labels: list[str | None] = [None] * len(rows)
    for source in sorted({r["source"] for r in rows}):
        test = [i for i, r in enumerate(rows) if r["source"] == source]
        train = [i for i, r in enumerate(rows) if r["source"] != source]
        options = {**PROBE_DEFAULTS, "layer": PROBE_LAYERS[column], "rule_weight": weight}
        model = fit_probe([rows[i] for i in train], reader, options, features=features[train, column],
                          terms=[terms[i] for i in train])
        judge = ProbeJudge(trained=model, reader=reader)
        probs = judge.probabilities([rows[i]["prompt"] for i in test], [rows[i]["response"] for i in test],
                                    features=features[test, column])
        for i, p in zip(test, probs):
            labels[i] = judge.classes[int(p.argmax())]
    return name, labels  # type: ignore[return-value]


def timed(judge, rows: Sequence[dict], n: int = N_SPEED) -> float:
    prompts = [rows[i % len(rows)]["prompt"] for i in range(n)]
    responses = [rows[i % len(rows)]["response"] for i in range(n)]
    start = time.perf_counter()
    judge.judge(prompts, responses)
    return round(time.perf_counter() - start, 3)


def main() -> None:
    RuleJudgeV2, RuleJudgeV3, RuleJudgeV4, RuleJudgeV5, RuleJudgeV6 = (
        frozen_rule_judge(FROZEN[name]) for name in ("rules-v2", "rules-v3", "rules-v4", "rules-v5", "rules-v6"))
    rows = [json.loads(line) for line in (FIXTURES / "responses.jsonl").read_text().splitlines() if line.strip()]
    held_out = set(json.loads((FIXTURES / "splits.json").read_text())["held_out_sources"])
    result: dict = {"rows": len(rows), "sources": len({r["source"] for r in rows}),
                    "held_out_sources": sorted(held_out), "frozen_rule_judges": FROZEN, "judges": {}}
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    for judge in (RuleJudgeV2(), RuleJudgeV3(), RuleJudgeV4(), RuleJudgeV5(), RuleJudgeV6(), RuleJudge()):
        result["judges"][judge.name] = report(rows, [v.label for v in judge.judge(prompts, responses)], held_out)
    best_name, best, ensembles = None, -1.0, {}
    with ProcessPoolExecutor(max_workers=len(CANDIDATES)) as pool:
        jobs = pool.map(candidate_predictions, [(options, rows) for options in CANDIDATES.values()])
        for (name, options), (labels, ensembles[name], seconds) in zip(CANDIDATES.items(), jobs):
            result["judges"][f"learned[{name}]"] = report(rows, labels, held_out) | {
                "options": options, "cv_seconds": seconds}
            print(name, result["judges"][f"learned[{name}]"]["all"], flush=True)
            mean = result["judges"][f"learned[{name}]"]["mean_per_source_binary"]
            if mean > best:
                best_name, best = name, mean
    result["chosen_learned"] = best_name
    for threshold, labels in ensembles[best_name].items():
        result["judges"][f"ensemble[{best_name}, t={threshold}]"] = report(rows, labels, held_out)
    reader = load_model(READER)
    features = probe_readings(reader, rows)
    terms = [rule_terms(r["response"], r["prompt"]) for r in rows]
    named = SimpleNamespace(spec=reader.spec, weights_sha256=reader.weights_sha256)  # the workers need no weights
    jobs = [(f"probe[L{layer}, rules x{weight:g}]", column, weight, rows, features, terms, named)
            for column, layer in enumerate(PROBE_LAYERS) for weight in PROBE_RULE_WEIGHTS]
    dev = [i for i, r in enumerate(rows) if r["source"] not in held_out]
    probes = {}
    with ProcessPoolExecutor(max_workers=2) as pool:
        for name, labels in pool.map(probe_predictions, jobs):
            result["judges"][name] = report(rows, labels, held_out)
            probes[name] = scores([rows[i] for i in dev], [labels[i] for i in dev])["binary"]
            print(name, result["judges"][name]["held_out_sources"], flush=True)
    chosen = max(probes, key=probes.get)  # by the development sources alone
    shipped = f"probe[L{PROBE_DEFAULTS['layer']}, rules x{PROBE_DEFAULTS['rule_weight']:g}]"
    result["probe"] = {"reader": READER, "chosen_by_development_sources": chosen, "shipped_options": shipped,
                       "development_binary": probes}
    result["speed"] = {"n_responses": N_SPEED, "target_s": TARGET_S}
    for judge in (RuleJudgeV2(), RuleJudgeV3(), RuleJudgeV4(), RuleJudgeV5(), RuleJudgeV6(), RuleJudge(),
                  LearnedJudge(), EnsembleJudge()):
        result["speed"][judge.name] = timed(judge, rows)
    probe = ProbeJudge(reader=reader)
    seconds = timed(probe, rows, N_PROBE_SPEED)
    result["speed"][probe.name] = {"n_responses": N_PROBE_SPEED, "seconds": seconds,
                                   "per_response_s": round(seconds / N_PROBE_SPEED, 4),
                                   "extrapolated_2000_s": round(seconds * N_SPEED / N_PROBE_SPEED, 1),
                                   "device": "cpu", "threads": torch.get_num_threads()}
    result["speed"]["target_met"] = all(result["speed"][j.name] < TARGET_S for j in (RuleJudge(), LearnedJudge()))
    result["speed"]["rules_over_v2"] = round(result["speed"][RuleJudge().name] / result["speed"][RuleJudgeV2().name], 3)
    write_result("judge", result)


if __name__ == "__main__":
    main()
