"""Every steering method on the same footing (methods.md, "Comparing steering methods"): ``torsion analyze methods``.

For each method and objective (comply, refuse), the strength is searched on train prompts by
:func:`torsion.optimize.run_optimize` (one study ``methods-<method>-<objective>`` in the run's
Optuna storage, grid or TPE), frozen, and evaluated once on the held-out harmful prompts;
capability beside it: MCQ accuracy and the perplexity ratio (steered / unsteered) of the
held-out neutral half, every position steered. Per method, the whole rate-vs-KL curve: a fixed
grid of strengths over the union of the objectives' ranges, each evaluated on the held-out
prompts, KL on the probe half of the neutral set (the half the search used).

Rates come from :func:`torsion.behaviour.class_rates` (refused = ``refusal_rate``, genuine
compliance = ``genuine_rate``, Wilson 95%). Matched KL: two methods of one objective whose probe
``kl_base_to_steered`` differ by at most 5% of the larger; a winner on the objective's target
rate (comply: genuine strong comply, refuse: refused) only when the intervals are disjoint.

Resumable: every finished (method, objective) row and curve point is appended to
``analysis/methods.checkpoint.jsonl`` under a hash of the settings that define it (all but the
method and objective lists, the judge, the model's weights, the run's vectors file; for splines the
manifold file); a rerun reuses them, also when it compares more or fewer methods, and a killed
search resumes from its study.

Example::

    result = run_methods(Path("runs/quick"), lm, CompareSettings(methods=("flat", "ace"), n_trials=6))
    result["methods"][0]["held_out"]["refused"]["ci95"], result["matched_kl"]
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torsion.assets import sha256_file
from torsion.behaviour import class_rates, evaluate_behaviour, result_rows
from torsion.config import COMPARED_METHODS
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.judge.base import Judge
from torsion.metrics import first_token_kl, mcq_accuracy, perplexity
from torsion.models import LoadedModel
from torsion.optimize import OBJECTIVES, SearchSettings, baseline_rates, mcq_items, prompt_sets, \
    run_generation_settings, run_optimize, search_method
from torsion.runs import run_judge
from torsion.search import grid_points
from torsion.steering.from_run import SPLINES, every_position, manifold_path
from torsion.steering.registry import method_class
from torsion.store import RunDir, append_jsonl, atomic_write_json, read_jsonl

SCHEMA_VERSION = 1
DEFAULT_METHODS = COMPARED_METHODS
MATCH_RTOL = 0.05  # methods.md: matched KL is within 5% on the probe half of the neutral set
TARGET = {"comply": "genuine_strong_comply", "refuse": "refused"}
RATES = ("refused", "genuine_strong_comply", "degenerate")
CHECKPOINT = "methods.checkpoint.jsonl"


@dataclass(frozen=True)
class CompareSettings:
    """One comparison: which methods and objectives, and the search each (method, objective) runs."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    objectives: tuple[str, ...] = OBJECTIVES
    sampler: str = "tpe"
    n_trials: int = 12
    curve_points: int = 5
    top_k: int = 4
    n_prompts: int = 24
    n_kl_prompts: int = 16
    n_mcq: int = 40
    batch_size: int = 8
    seed: int = 0
    manifold: str | None = None

    def __post_init__(self) -> None:
        names = tuple(method_class(name).name for name in self.methods)
        if not names or len(set(names)) != len(names):
            raise TorsionError(f"methods {list(self.methods)} must be one or more distinct names; list each once")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise TorsionError(f"objectives {list(self.objectives)} must be distinct, from comply and refuse")
        if self.n_mcq < 0:
            raise TorsionError(f"n_mcq={self.n_mcq}; pass 0 (no MCQ) or more items")
        if self.curve_points < 1 or self.n_trials < 1:
            raise TorsionError("a comparison needs at least 1 trial and 1 curve point; raise --trials/--curve-points")
        object.__setattr__(self, "methods", names)
        object.__setattr__(self, "objectives", tuple(self.objectives))

    def search(self, method: str, objective: str) -> SearchSettings:
        return SearchSettings(objective=objective, method=method, manifold=self.manifold, n_trials=self.n_trials,
                              sampler=self.sampler, top_k=self.top_k, n_prompts=self.n_prompts,
                              n_kl_prompts=self.n_kl_prompts,
                              n_mcq=self.n_mcq, batch_size=self.batch_size, seed=self.seed)


def ensure_manifold(run_dir: Path, settings: CompareSettings, log: Callable[[str], None] = print) -> dict | None:
    """The splines' manifold file: the given one, the run's own, or fitted now (recorded); None without splines."""
    if not set(settings.methods) & set(SPLINES):
        return None
    run = RunDir(run_dir)
    path = manifold_path(run, settings.manifold)
    fitted = False
    if not path.is_file():
        if settings.manifold is not None:
            raise TorsionError(f"manifold file {path} not found; check --manifold")
        from torsion.manifold.build import fit_run_manifold

        log(f"no {path.name}: fitting the run's manifold (knots from its train rows, splines A and B)")
        fit_run_manifold(run.root)
        fitted = True
    return {"file": str(path), "sha256": sha256_file(path), "fitted_by_this_comparison": fitted}


def _pick(rates: dict[str, Any]) -> dict[str, Any]:
    """``n`` (judged rows) and the compared classes' shares of a :func:`class_rates` table."""
    return {"n": rates["refused"]["n"], **{name: rates[name] for name in RATES}}


def _held_out_rows(evaluation: dict[str, Any], holdout: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"id": p.id, "category": p.category, "label": label, "correction": correction}
            for p, label, correction in zip(holdout, evaluation["labels"], evaluation["corrections"], strict=True)]


def by_category(evaluation: dict[str, Any], holdout: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Held-out rates per prompt category (``n`` = judged rows in the cell), from one evaluation."""
    rows = result_rows(evaluation)
    table = {}
    for category in sorted({p.category for p in holdout}):
        index = [i for i, p in enumerate(holdout) if p.category == category]
        rates = class_rates([holdout[i].prompt for i in index], [evaluation["responses"][i] for i in index],
                            [evaluation["labels"][i] for i in index], rows=[rows[i] for i in index])
        table[category] = _pick(rates)
    return table


def _mcq(lm: LoadedModel, settings: CompareSettings, steer: Any = None) -> float | None:
    """MCQ accuracy on ``n_mcq`` built-in items (None when ``n_mcq`` is 0: a model without letter tokens)."""
    if not settings.n_mcq:
        return None
    return mcq_accuracy(lm, mcq_items(settings.n_mcq, settings.seed), steer)["accuracy"]


def _compare_row(run: RunDir, lm: LoadedModel, settings: CompareSettings, name: str, objective: str,
                 base: dict[str, float], judge: Judge, log: Callable[[str], None]) -> dict[str, Any]:
    search = settings.search(name, objective)
    result = run_optimize(run.root, lm, search, study_name=f"methods-{name}-{objective}", judge=judge, write=False,
                          log=log)
    method, _, _ = search_method(run, lm, search)
    sets = prompt_sets(run, search)
    strength = result["strength"]
    held = result["held_out"]
    accuracy = _mcq(lm, settings, method.factory(lm, strength))
    texts = [p.prompt for p in sets["kl_eval"]]
    ratio = perplexity(lm, texts, every_position(method).factory(lm, strength))["perplexity"] / base["perplexity"]
    in_sample = result["in_sample"]
    return {
        "method": name, "objective": objective, "study": result["study"], "strength_name": result["strength_name"],
        "strength": strength, "search_range": list(result["settings"]["alpha_range"]),
        "kl_base_to_steered": in_sample["kl_base_to_steered"], "kl_steered_to_base": in_sample["kl_steered_to_base"],
        "held_out": {"n_prompts": held["n_prompts"], **_pick(held["rates"]),
                     "kl_base_to_steered": held["kl_base_to_steered"],
                     "kl_steered_to_base": held["kl_steered_to_base"], "kl_prompts": "kl_eval",
                     "rows": _held_out_rows(held, sets["holdout"])},
        "held_out_by_category": by_category(held, sets["holdout"]),
        "in_sample": {"n_prompts": in_sample["n_prompts"],
                      **_pick(in_sample["rates"]), "trial": result["best"]["number"]},
        "mcq_accuracy": accuracy, "mcq_accuracy_base": base["mcq_accuracy"], "perplexity_ratio": ratio,
        "layers": result["layers"], "applied_norm": held["steering"]["applied_norm"],
        "mean_delta_norm": held["steering"]["mean_delta_norm"], "method_record": result["method"],
        "trials": [{k: t.get(k) for k in ("number", "state", "value", "strength", "kl_base_to_steered", "rates")}
                   for t in result["trials"]],
    }


def curve_strengths(lm: LoadedModel, run: RunDir, settings: CompareSettings, name: str) -> list[float]:
    """``curve_points`` evenly spaced strengths over the union of the objectives' search ranges."""
    method, _, _ = search_method(run, lm, settings.search(name, settings.objectives[0]))
    ranges = [method.search_range(objective) for objective in settings.objectives]
    return grid_points(min(r[0] for r in ranges), max(r[1] for r in ranges), settings.curve_points)


def _curve_point(run: RunDir, lm: LoadedModel, settings: CompareSettings, name: str, strength: float,
                 judge: Judge) -> dict[str, Any]:
    search = settings.search(name, settings.objectives[0])
    method, _, _ = search_method(run, lm, search)
    sets = prompt_sets(run, search)
    held = evaluate_behaviour(lm, [p.prompt for p in sets["holdout"]], method.factory(lm, strength),
                              run_generation_settings(run, search), judge=judge, desc=f"{name} curve {strength:+.3g}")
    kl = first_token_kl(lm, [p.prompt for p in sets["kl_probe"]], method.factory(lm, strength))
    return {"strength": strength, "kl_base_to_steered": kl["kl_base_to_steered"],
            "kl_steered_to_base": kl["kl_steered_to_base"], **_pick(held["rates"])}


def matched_kl(rows: Sequence[dict[str, Any]], rtol: float = MATCH_RTOL) -> list[dict[str, Any]]:
    """Pairs of one objective's methods whose probe KLs are within ``rtol`` of the larger; winner if disjoint."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        if a["objective"] != b["objective"]:
            continue
        ka, kb = a["kl_base_to_steered"], b["kl_base_to_steered"]
        if abs(ka - kb) > rtol * max(ka, kb):
            continue
        rate = TARGET[a["objective"]]
        ra, rb = a["held_out"][rate], b["held_out"][rate]
        winner = None
        if ra["ci95"] and rb["ci95"]:
            if ra["ci95"][0] > rb["ci95"][1]:
                winner = a["method"]
            elif rb["ci95"][0] > ra["ci95"][1]:
                winner = b["method"]
        pairs.append({"objective": a["objective"], "methods": [a["method"], b["method"]],
                      "kl_base_to_steered": [ka, kb], "rate": rate, "held_out": [ra, rb], "winner": winner})
    return pairs


def run_methods(run_dir: Path, lm: LoadedModel, settings: CompareSettings, *, judge: Judge | None = None,
                manifold: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the comparison; write ``analysis/methods.json`` and return it.

    ``manifold`` is :func:`ensure_manifold`'s record when the caller already ran it (to fail
    before loading a model); otherwise it runs here.
    """
    run = RunDir(run_dir)
    judge = judge or run_judge(run)
    found = manifold if manifold is not None else ensure_manifold(run.root, settings, log)
    shared = {k: v for k, v in asdict(settings).items() if k not in ("methods", "objectives")}  # rows carry those
    vectors = sha256_file(run.vectors_path) if run.vectors_path.is_file() else None  # refit after a review: recompute
    spec = {"settings": shared, "judge": judge.name, "weights_sha256": lm.weights_sha256, "vectors_sha256": vectors}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = run.analysis_path("methods").with_name(CHECKPOINT)
    done = {tuple(line["entry"]): line["value"] for line in (read_jsonl(checkpoint) if checkpoint.is_file() else [])
            if line.get("key") == key and isinstance(line.get("entry"), list) and "value" in line}

    def cached(entry: tuple, compute: Callable[[], Any]) -> Any:
        if entry not in done:
            done[entry] = compute()
            append_jsonl(checkpoint, [{"key": key, "entry": list(entry), "value": done[entry]}])
        return done[entry]

    def tag(name: str) -> tuple:  # a spline's rows depend on the manifold file too
        return (found["sha256"],) if found and name in SPLINES else ()

    manifold = found and cached(("manifold", found["sha256"]), lambda: found)  # a resumed comparison keeps "fitted"
    first = settings.search(settings.methods[0], settings.objectives[0])
    sets = prompt_sets(run, first)

    def base_capability() -> dict[str, float]:
        return {"mcq_accuracy": _mcq(lm, settings),
                "perplexity": perplexity(lm, [p.prompt for p in sets["kl_eval"]])["perplexity"]}

    base = cached(("base",), base_capability)
    rows, curves = [], {}
    for name in settings.methods:
        for objective in settings.objectives:
            log(f"methods: {name}, {objective}")
            rows.append(cached(("row", name, objective, *tag(name)),
                               lambda: _compare_row(run, lm, settings, name, objective, base, judge, log)))
        points = [cached(("curve", name, strength, *tag(name)),
                         lambda: _curve_point(run, lm, settings, name, strength, judge))
                  for strength in curve_strengths(lm, run, settings, name)]
        curves[name] = {"strength_name": method_class(name).strength_name, "points": points}
    baseline = baseline_rates(run, sets["holdout"], judge)
    result = {
        "schema_version": SCHEMA_VERSION, "analysis": "methods", "settings": asdict(settings), "judge": judge.name,
        "manifold": manifold, "spec_key": key,
        "conventions": {
            "layer_indexing": LAYER_INDEXING,
            "kl": "first-token kl_base_to_steered and kl_steered_to_base on the neutral probe half (the search's); "
                  "held_out.kl_* on the other half",
            "rates": "share of judged rows (judge errors excluded), Wilson 95%; refused = refusal_rate, "
                     "genuine_strong_comply = genuine_rate, after false-positive correction",
            "strength": "per method: alpha (flat, dense, ace), beta (ablations), t (splines)",
            "search": "strength searched on train prompts (torsion optimize), frozen, evaluated once on the holdout",
            "matched_kl": f"same objective, probe KLs within {MATCH_RTOL:.0%} of the larger; winner on the "
                          "objective's target rate only when the Wilson intervals are disjoint",
            "curves": "fixed strength grid over the union of the objectives' ranges, held-out prompts",
            "perplexity_ratio": "steered / unsteered perplexity of the held-out neutral half, every position steered",
            "mcq_accuracy": f"{settings.n_mcq} built-in MCQ items, highest-logit answer letter"},
        "baseline_held_out": _pick(baseline["rates"]),
        "baseline_held_out_by_category": {
            category: _pick(baseline_rates(run, [p for p in sets["holdout"] if p.category == category], judge)["rates"])
            for category in sorted({p.category for p in sets["holdout"]})},
        "base_capability": base,
        "methods": [{k: v for k, v in r.items() if k != "held_out_by_category"} for r in rows],
        "curves": curves, "matched_kl": matched_kl(rows),
        "by_category": [{"method": r["method"], "objective": r["objective"], "categories": r["held_out_by_category"]}
                        for r in rows],
    }
    atomic_write_json(run.analysis_path("methods"), result)
    return result
