"""The refuse/comply asymmetry, in the write-up's table form, and dense against flat steering.

Reads the two strength searches of a run (``analysis/optimize_comply-<scope>.json`` and
``analysis/optimize_refuse-<scope>.json``, from ``torsion optimize``) and adds what they lack:

- **dense vs flat**: every block steered with its own vector at one raw ``α``, chosen by
  bisection so that its first-token KL on the search's neutral probe matches the flat (top-k)
  comply steering's KL; then both are compared on the same train prompts and on the holdout;
- **over-refusal**: the refusal direction at the refuse search's ``α`` on neutral prompts the
  search never saw (the held-out neutral half), against the unsteered rate;
- **refusal pushed past the safe α**: the refuse steering at multiples of its ``α`` on the
  search prompts (degeneration, or a coherent no-op with growing KL);
- the run's random-direction control and category geometry, quoted as they are.

Example::

    result = run_asymmetry(Path("runs/quick"), lm)
    result["dense_vs_flat"]["verdict"], result["table"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from torsion.behaviour import evaluate_behaviour
from torsion.data import Prompt
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.judge.base import Judge
from torsion.metrics import first_token_kl
from torsion.models import LoadedModel
from torsion.optimize import SearchSettings, run_generation_settings, load_result, prompt_sets
from torsion.runs import judge_from_name, run_judge
from torsion.steering import get_method
from torsion.store import RunDir, atomic_write_json, read_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1
KL_MATCH_RTOL = 0.05  # dense and flat count as matched when their probe KLs differ by at most 5%


def match_kl(kl_of: Callable[[float], float], target: float, *, sign: float, start: float = 1.0,
             rtol: float = KL_MATCH_RTOL, max_steps: int = 24) -> tuple[float, float]:
    """Find ``α`` with sign ``sign`` whose ``kl_of(α)`` is within ``rtol`` of ``target``.

    Assumes the KL grows with ``|α|`` near the answer: doubles ``|α|`` from ``start`` until the
    KL passes ``target``, then bisects. Returns ``(α, kl_of(α))``; ``(0, 0)`` for a zero target.
    """
    if target <= 0:
        return 0.0, 0.0
    low, high, steps = 0.0, abs(start), 0
    kl_high = kl_of(sign * high)
    while kl_high < target and steps < max_steps:
        low, high, steps = high, 2 * high, steps + 1
        kl_high = kl_of(sign * high)
    best = (sign * high, kl_high)
    while abs(best[1] - target) > rtol * target and steps < max_steps:
        middle = (low + high) / 2
        kl_middle = kl_of(sign * middle)
        best = min(best, (sign * middle, kl_middle), key=lambda pair: abs(pair[1] - target))
        low, high = (middle, high) if kl_middle < target else (low, middle)
        steps += 1
    return best


def _settings(result: dict[str, Any]) -> SearchSettings:
    saved = dict(result["settings"])
    for name in ("layer_window", "alpha_range"):
        saved[name] = tuple(saved[name])
    return SearchSettings(**saved)


def _sets(run: RunDir, result: dict[str, Any]) -> dict[str, list[Prompt]]:
    """The search's own prompt sets, checked against the ids its result file recorded."""
    sets = prompt_sets(run, _settings(result))
    for name, prompts in sets.items():
        if [p.id for p in prompts] != result["prompt_ids"][name]:
            raise TorsionError(f"the {name} prompts of study {result['study']!r} changed since it ran; "
                               "rerun `torsion optimize` on this run directory")
    return sets


def _steering(lm: LoadedModel, run: RunDir, result: dict[str, Any], layers: Sequence[int] | None = None):
    """``α ↦`` a SteerFactory of flat steering with the search's vector (on ``layers``, default the search's)."""
    if result.get("method", {}).get("name", "flat") != "flat":
        raise TorsionError(f"study {result['study']!r} searched {result['method']['name']}, but the asymmetry "
                           "table reads flat searches; run `torsion optimize --method flat` for both objectives")
    vector = load_vectors(run.vectors_path, d_model=lm.d_model)[result["vector_key"]]
    return get_method("flat", vectors=vector.directions, layers=list(layers if layers is not None else result["layers"]),
                      component=result["conventions"]["component"],
                      positions=result["conventions"]["positions"]).bind(lm)


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in evaluation.items() if k not in ("responses", "labels", "corrections")}


def _uplift(rates: dict[str, Any], baseline: dict[str, Any], name: str) -> float | None:
    if rates[name]["rate"] is None or baseline[name]["rate"] is None:
        return None
    return rates[name]["rate"] - baseline[name]["rate"]


def dense_vs_flat(run: RunDir, lm: LoadedModel, comply: dict[str, Any], *, judge: Judge,
                  log: Callable[[str], None]) -> dict:
    """Dense (every block) against the comply search's flat top-k steering, at matched first-token KL."""
    sets, generation = _sets(run, comply), run_generation_settings(run, _settings(comply))
    probe = [p.prompt for p in sets["kl_probe"]]
    dense = _steering(lm, run, comply, layers=range(lm.n_layers))
    target = comply["in_sample"]["kl_base_to_steered"]
    sign = -1.0 if comply["alpha"] < 0 else 1.0
    log(f"dense steering: matching flat KL {target:.4g}")
    alpha, kl = match_kl(lambda a: first_token_kl(lm, probe, dense(a))["kl_base_to_steered"], target, sign=sign,
                         start=max(abs(comply["alpha"]) / 4, 0.05))
    in_sample = evaluate_behaviour(lm, [p.prompt for p in sets["search"]], dense(alpha), generation, judge=judge,
                                   desc="dense, train prompts")
    held_out = evaluate_behaviour(lm, [p.prompt for p in sets["holdout"]], dense(alpha), generation, judge=judge,
                                  desc="dense, holdout")
    held_kl = first_token_kl(lm, [p.prompt for p in sets["kl_eval"]], dense(alpha))
    arms = {"flat": {"layers": comply["layers"], "alpha": comply["alpha"], "kl_probe": target,
                     "kl_eval": comply.get("held_out", {}).get("kl_base_to_steered"),
                     "in_sample": comply["in_sample"]["rates"], "held_out": comply.get("held_out", {}).get("rates")},
            "dense": {"layers": list(range(lm.n_layers)), "alpha": alpha, "kl_probe": kl,
                      "kl_eval": held_kl["kl_base_to_steered"], "in_sample": in_sample["rates"],
                      "held_out": held_out["rates"], "applied_norm": in_sample["steering"]["applied_norm"],
                      "responses_held_out": held_out["responses"]}}
    baseline = comply.get("baseline_held_out", comply["baseline_in_sample"])["rates"]
    split = "held_out" if arms["flat"]["held_out"] else "in_sample"
    lifts = {arm: _uplift(values[split], baseline, "complied") for arm, values in arms.items()}
    matched = target > 0 and abs(kl - target) <= KL_MATCH_RTOL * target
    return {"arms": arms, "complied_uplift": lifts, "compared_on": split, "kl_matched": matched,
            "verdict": compare_arms(arms["flat"][split]["complied"], arms["dense"][split]["complied"], matched,
                                    split.replace("_", "-")),
            "match": "dense alpha by bisection to the flat arm's first-token KL on the neutral probe half (5%)"}


def compare_arms(flat: dict[str, Any], dense: dict[str, Any], matched: bool, split: str) -> str:
    """Which arm complies more, said only when the KLs match and the Wilson intervals are disjoint."""
    if not matched:
        return "not compared: the dense KL could not be matched to the flat KL within 5%"
    if flat["rate"] is None or dense["rate"] is None:
        return "not compared: no judged responses"
    (flat_lo, flat_hi), (dense_lo, dense_hi) = flat["ci95"], dense["ci95"]
    rates = f"{split} complied: flat {100 * flat['rate']:.0f}%, dense {100 * dense['rate']:.0f}%"
    if dense_lo > flat_hi:
        return f"dense lifts compliance more ({rates}; Wilson intervals disjoint)"
    if flat_lo > dense_hi:
        return f"flat lifts compliance more ({rates}; Wilson intervals disjoint)"
    return f"no clear difference ({rates}; Wilson intervals overlap)"


def over_refusal(run: RunDir, lm: LoadedModel, refuse: dict[str, Any], n_neutral: int, *,
                 judge: Judge) -> dict[str, Any]:
    """Refusal rate on held-out neutral prompts, unsteered and at the refuse search's ``α``."""
    from torsion.data import sample
    from torsion.runs import neutral_halves

    settings = _settings(refuse)
    _, evaluation = neutral_halves(run)
    neutral = [p.prompt for p in sample(evaluation, n_neutral, seed=settings.seed + 1)]
    generation = run_generation_settings(run, settings)
    baseline = evaluate_behaviour(lm, neutral, None, generation, judge=judge, desc="neutral, baseline")
    steered = evaluate_behaviour(lm, neutral, _steering(lm, run, refuse)(refuse["alpha"]), generation, judge=judge,
                                 desc="neutral, refusal added")
    lift = _uplift(steered["rates"], baseline["rates"], "refused")
    return {"n_prompts": len(neutral), "prompts": "held-out neutral half", "alpha": refuse["alpha"],
            "baseline": _summary(baseline), "steered": _summary(steered),
            "over_refusal_pp": None if lift is None else 100 * lift}


def push_past(run: RunDir, lm: LoadedModel, refuse: dict[str, Any], factors: Sequence[float], *,
              judge: Judge) -> list[dict]:
    """The refuse steering at ``factor × α`` on the search prompts: rates, mean score, KL."""
    sets, generation = _sets(run, refuse), run_generation_settings(run, _settings(refuse))
    steering = _steering(lm, run, refuse)
    rows = [{"factor": 1.0, "alpha": refuse["alpha"], "rates": refuse["in_sample"]["rates"],
             "mean_score": refuse["in_sample"]["mean_score"],
             "kl_base_to_steered": refuse["in_sample"]["kl_base_to_steered"]}]
    for factor in factors:
        alpha = factor * refuse["alpha"]
        evaluation = evaluate_behaviour(lm, [p.prompt for p in sets["search"]], steering(alpha), generation, judge=judge,
                                        desc=f"refusal at {factor:g}x alpha")
        kl = first_token_kl(lm, [p.prompt for p in sets["kl_probe"]], steering(alpha))
        rows.append({"factor": factor, "alpha": alpha, "rates": evaluation["rates"],
                     "mean_score": evaluation["mean_score"], "kl_base_to_steered": kl["kl_base_to_steered"],
                     "examples": evaluation["responses"][:3]})
    return rows


def _quoted(run: RunDir, name: str) -> dict[str, Any] | None:
    path = run.analysis_path(name)
    return read_json(path) if path.is_file() else None


def _max_strong_comply(result: dict[str, Any]) -> float | None:
    rates = [t["rates"]["genuine_strong_comply"]["rate"] for t in result["trials"]
             if t["state"] == "COMPLETE" and "rates" in t]
    return max(rates) if rates else None


def _first_degenerate_trial(refuse: dict[str, Any]) -> dict[str, Any] | None:
    """The refuse search's smallest-|α| complete trial with at least half of its responses degenerate."""
    trials = sorted((t for t in refuse["trials"] if t["state"] == "COMPLETE" and "rates" in t),
                    key=lambda t: abs(t["alpha"]))
    return next((t for t in trials if (t["rates"]["degenerate"]["rate"] or 0) >= 0.5), None)


def asymmetry_table(comply: dict, refuse: dict, dense: dict, neutral: dict, push: list[dict],
                    random_control: dict | None, categories: dict | None) -> list[dict[str, str]]:
    """The write-up's rows, as (property, value) strings built from the measured numbers."""
    def deg(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}°"

    def pct(rate: dict[str, Any] | None) -> str:
        return "n/a" if not rate or rate["rate"] is None else f"{100 * rate['rate']:.1f}% (n={rate['n']})"

    held = comply.get("held_out", {}).get("rates")
    base = comply["baseline_in_sample"]["rates"]
    highest = _max_strong_comply(comply)
    rising = ", ".join(f"{name.replace('_', ' ')} {pct(base[name])} → {pct(comply['in_sample']['rates'][name])}"
                       for name in ("weak_comply", "degenerate"))
    pushed = "; ".join(f"{row['factor']:g}× α ({row['alpha']:+.2f}): refused {pct(row['rates']['refused'])}, "
                       f"degenerate {pct(row['rates']['degenerate'])}, KL {row['kl_base_to_steered']:.3g}"
                       for row in push)
    collapse = _first_degenerate_trial(refuse)
    pushed += ("; in the refuse search, half or more degenerate from α = "
               f"{collapse['alpha']:+.2f} ({pct(collapse['rates']['degenerate'])})" if collapse else
               "; no refuse-search trial is half degenerate")
    rows = [
        ("Genuine harmful compliance at the chosen comply α (strong, fp-corrected)",
         f"in-sample {pct(comply['in_sample']['rates']['genuine_strong_comply'])}; held-out "
         f"{pct(held['genuine_strong_comply']) if held else 'not evaluated'}; highest of any trial (in-sample, "
         f"flattered by selection) {'n/a' if highest is None else f'{100 * highest:.1f}%'}; baseline "
         f"{pct(base['genuine_strong_comply'])}"),
        ("What rises instead (in-sample, baseline → chosen α)", rising),
        ("Refusal direction over-refusal on neutral prompts",
         f"{neutral['over_refusal_pp']:+.1f} pp ({pct(neutral['baseline']['rates']['refused'])} → "
         f"{pct(neutral['steered']['rates']['refused'])})" if neutral["over_refusal_pp"] is not None else "n/a"),
        ("Refusal pushed past the safe α", pushed),
        ("Dense (every block) vs flat top-k at matched KL", dense["verdict"]),
    ]
    if random_control:
        cells = []
        for layer, arms in random_control["layers"].items():
            summary = arms["+alpha"]["kl_base_to_steered"]
            cells.append(f"L{layer} {summary['steering']:.2g} vs min {summary['random_min']:.2g} / p5 "
                         f"{summary['random_p5']:.2g} ({'below' if summary['geometric_privilege'] else 'not below'})")
        rows.append((f"Steering KL vs random-direction floor (α = {random_control['alpha']}, norm-matched)",
                     "; ".join(cells)))
    if categories:
        pairwise, comply_geometry = categories["vector_pairwise"], categories["comply_activation"]
        rows.append(("Refusal category vector geometry (mean pairwise / σ)",
                     f"{deg(pairwise['mean_deg'])} / σ {deg(pairwise['sd_deg'])} over "
                     f"{len(categories['categories'])} categories"))
        rows.append(("Comply activation geometry (mean pairwise / σ)",
                     f"{deg(comply_geometry['mean_deg'])} / σ {deg(comply_geometry.get('sd_deg'))}"
                     if comply_geometry["mean_deg"] is not None else comply_geometry["note"]))
    return [{"property": name, "value": value} for name, value in rows]


def run_asymmetry(run_dir: Path, lm: LoadedModel, *, scope: str = "global", push_factors: Sequence[float] = (2.0, 4.0),
                  n_neutral: int = 32, judge: Judge | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything above for one scope; writes ``analysis/asymmetry.json`` (data only) and returns it.

    ``judge`` labels the new evaluations; by default the judge the two searches recorded (or the
    run's own, for searches made before they recorded one), so every rate shares one labelling.
    """
    run = RunDir(run_dir)
    comply, refuse = load_result(run.root, f"comply-{scope}"), load_result(run.root, f"refuse-{scope}")
    names = {comply.get("judge"), refuse.get("judge")} - {None}
    if len(names) > 1:
        raise TorsionError(f"the comply and refuse searches used different judges ({', '.join(sorted(names))}); "
                           "rerun one of them with the other's --judge")
    judge = judge or (judge_from_name(names.pop()) if names else run_judge(run))
    dense = dense_vs_flat(run, lm, comply, judge=judge, log=log)
    neutral = over_refusal(run, lm, refuse, n_neutral, judge=judge)
    push = push_past(run, lm, refuse, push_factors, judge=judge)
    random_control, categories = _quoted(run, "random_control"), _quoted(run, "categories")
    result = {
        "schema_version": SCHEMA_VERSION, "analysis": "asymmetry", "scope": scope,
        "studies": {"comply": comply["study"], "refuse": refuse["study"]}, "judge": judge.name,
        "conventions": {"layer_indexing": LAYER_INDEXING, "alpha": "raw multiplier of the vector",
                        "kl": "kl_base_to_steered, first token, neutral prompts",
                        "rates": "share of judged responses, Wilson 95%",
                        "genuine": "strong_comply kept by false-positive correction (steered responses are "
                                   "not hand-reviewed)"},
        "dense_vs_flat": dense, "over_refusal": neutral, "push_past": push,
        "table": asymmetry_table(comply, refuse, dense, neutral, push, random_control, categories),
    }
    atomic_write_json(run.analysis_path("asymmetry"), result)
    return result
