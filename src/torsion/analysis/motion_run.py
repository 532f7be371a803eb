"""``torsion analyze motion`` and ``torsion analyze hedge`` on a run directory.

Both read one strength sweep of a steering method (default ``flat``: ``α · v_l`` on the run's MD
vectors at the steered blocks; any method of :mod:`torsion.steering`) on held-out harmful prompts, with decoding-time capture at the readout blocks
(:mod:`torsion.decoding_capture`). The sweep's captures are files under ``RUN_DIR/motion/``
(``unsteered.safetensors``, ``alpha_<α>.safetensors`` for flat, ``<method>_<strength>.safetensors``
otherwise, and their responses), so a killed sweep
resumes and the second command reuses the first one's generations.

Example::

    result = run_motion("runs/quick", lm, alphas=[-1, -2, -4], n_prompts=32)
    result["alphas"]["-2.0"]["blocks"]["18"]["generated"]["orthogonal_fraction_steered_axis"]
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.hedge import MIN_GROUP, hedge_geometry_test
from torsion.analysis.motion import compliance_destination, motion_stats
from torsion.analysis.propagation import run_vector, split_prompts
from torsion.behaviour import class_rates, correct_rows
from torsion.conventions import LAYER_INDEXING
from torsion.decoding_capture import DEFAULT_K, capture_generation_to_file, check_readout
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge import get_judge
from torsion.judge.base import Judge
from torsion.judge.correction import Corrected
from torsion.models import LoadedModel
from torsion.steering.base import SteeringMethod
from torsion.steering.from_run import run_method
from torsion.store import RunDir, atomic_write_bytes, atomic_write_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1
N_STRENGTHS = 4  # the default grid: flat's comply range (-4 … 0) gives -1, -2, -3, -4
POSITIONS = ("last", "generated")


def require_vectors(run_dir: Path) -> None:
    """A one-line error unless the run has its vectors (the sweep steers with ``md/resid``)."""
    path = RunDir(run_dir).vectors_path
    if not path.is_file():
        raise TorsionError(f"{path} does not exist; finish the run's vectors stage (`torsion run` on "
                           "the same directory) before the motion or hedge analysis")


def strength_grid(method: SteeringMethod, n: int = N_STRENGTHS) -> list[float]:
    """``n`` strengths from the method's comply ``search_range``, stepping away from its end nearer 0.

    Flat's ``(-4, 0)`` gives ``[-1, -2, -3, -4]``; ablation's ``(0, 1)`` gives ``[0.25, 0.5, 0.75, 1]``.
    """
    low, high = method.search_range("comply")
    near, far = (low, high) if abs(low) <= abs(high) else (high, low)
    return [near + (far - near) * i / n for i in range(1, n + 1)]


def sweep(run_dir: Path, lm: LoadedModel, *, alphas: Sequence[float] | None = None,
          layers: Sequence[int] | None = None, readout_blocks: Sequence[int] | None = None, k: int = DEFAULT_K,
          n_prompts: int = 16, positions: str = "all", max_new_tokens: int = 24, batch_size: int = 8,
          judge: Judge | None = None, seed: int = 0, steering: str = "flat",
          steering_params: dict[str, Any] | None = None, manifold: str | Path | None = None) -> dict[str, Any]:
    """Generate the unsteered run and each strength with decoding-time capture; judge every response.

    ``steering`` names the method (:func:`torsion.steering.from_run.run_method` builds it from the
    run with ``steering_params`` and ``manifold``); ``alphas`` are its strengths (``t`` for the
    splines), default :func:`strength_grid`. Defaults: ``layers`` the flat method's top-4 blocks by
    train-split AUC (:func:`torsion.selection.select_layers`); readout blocks every block from
    the first steered block + 1 to the last. Prompts: a seeded sample of the holdout split.
    ``judge`` (default: the rule judge) labels every response; the false-positive correction is
    applied to every label (:func:`torsion.behaviour.correct_rows`).

    Returns the settings, the axes ``[n_layers, d_model]`` (the run's ``md/resid``), and per arm
    (``"unsteered"`` and each ``α``) its tensors, responses, labels and steering record.
    """
    from torsion.selection import select_layers

    run = RunDir(run_dir)
    require_vectors(run.root)
    axes = run_vector(load_vectors(run.vectors_path, d_model=lm.d_model), "md/resid")  # [n_layers, d_model]
    steered = sorted(int(b) for b in (layers or select_layers(run.root, key="md/resid", k=4)["layers"]))
    readout = sorted(int(b) for b in readout_blocks) if readout_blocks else list(range(steered[0] + 1, lm.n_layers))
    readout = readout or [lm.n_layers - 1]
    check_readout(readout, k=k, n_layers=lm.n_layers, steered_blocks=steered)
    method, method_record = run_method(run, lm, steering, vectors=axes, layers=steered, component="resid",
                                       positions=positions, params=steering_params, manifold=manifold)
    alphas = [float(a) for a in (alphas or strength_grid(method))]
    if 0.0 in alphas and method.name == "flat":
        raise TorsionError("alpha 0 is the unsteered arm, which the sweep always runs; drop 0 from --alpha")
    prompts = split_prompts(run, "holdout", n_prompts, seed)
    settings = GenerationSettings(max_new_tokens=max(max_new_tokens, k + 1), batch_size=batch_size)
    judge = judge or get_judge("rules")
    tag = {"readout_blocks": ",".join(map(str, readout)), "steered_blocks": ",".join(map(str, steered)),
           "positions_steered": positions, "n_prompts": str(len(prompts)), "seed": str(seed)}
    if method.name != "flat":  # another method's captures are other files, and its parameters are checked
        tag.update(method=method.name, method_sha256=method_record["tensors_sha256"],
                   method_params=json.dumps(method.params(), sort_keys=True))
    prefix = "alpha" if method.name == "flat" else method.name
    arms: dict[str, Any] = {}
    for alpha in [None, *alphas]:
        name = "unsteered" if alpha is None else str(alpha)
        records: list[Any] = []
        steer = None if alpha is None else _recording(method.factory(lm, alpha), records)
        path = run.root / "motion" / ("unsteered.safetensors" if alpha is None else f"{prefix}_{alpha:g}.safetensors")
        tensors, responses = capture_generation_to_file(
            lm, prompts, path, readout_blocks=readout, k=k, settings=settings, steer=steer, steered_blocks=steered,
            metadata={**tag, "alpha": name})
        labels = [v.label for v in judge.judge(prompts, responses)]
        record = None
        if steer is not None:
            if not records:  # resumed from the file: the record of an empty context (no ||h' - h|| measured)
                with steer():
                    pass
            record = records[-1].conventions()
        arms[name] = {"tensors": tensors, "responses": responses, "labels": labels, "steering": record,
                      "behaviour": correct_rows(prompts, responses, labels)}
    return {"prompts": prompts, "alphas": alphas, "steered_blocks": steered, "readout_blocks": readout, "k": k,
            "axes": axes, "method": method_record, "arms": arms, "judge": judge.name, "judge_object": judge, "settings": settings, "positions": positions,
            "seed": seed}


def _recording(factory: Callable[[], AbstractContextManager[Any]], records: list[Any]) -> Callable[[], Any]:
    """``factory`` whose every context's record is appended to ``records`` (read after the work is done)."""

    @contextmanager
    def steer() -> Iterator[Any]:
        with factory() as record:
            records.append(record)
            yield record

    return steer


def _states(arm: dict[str, Any], position: str) -> Tensor:
    """``[n_prompts, n_readout, d_model]`` at ``last`` or ``generated``."""
    return arm["tensors"][f"{position}/resid"]


def _conventions(data: dict[str, Any]) -> dict[str, Any]:
    return {"layer_indexing": LAYER_INDEXING, "component": "resid", "positions": list(POSITIONS),
            "generated": f"mean resid over the first K = {data['k']} generated tokens, each read when fed back",
            "vector": "md/resid", "method": data["method"]["name"],
            "strength_name": data["method"]["strength_name"], "steered_axis": f"block {data['steered_blocks'][0]} (the first steered block)",
            "split": "holdout", "steering_positions": data["positions"], "judge": data["judge"],
            "max_new_tokens": data["settings"].max_new_tokens, "interval": "basic bootstrap 95%, clipped to range"}


def run_motion(run_dir: Path, lm: LoadedModel, *, B: int = 1000, **sweep_options: Any) -> dict[str, Any]:
    """Orthogonal motion per ``α``, readout block and position: ``analysis/motion.json`` and ``motion.safetensors``.

    ``motion.safetensors`` holds ``u/<alpha>/<block>`` (generated position), ``u_last/<alpha>/<block>``
    (last position) and ``axis/<block>`` (the readout block's MD vector), each ``[d_model]``.
    """
    from safetensors.torch import save

    run = RunDir(run_dir)
    data = sweep(run.root, lm, **sweep_options)
    base = data["arms"]["unsteered"]
    axes, first = data["axes"], data["steered_blocks"][0]
    tensors: dict[str, Tensor] = {f"axis/{b}": axes[b].float().contiguous() for b in data["readout_blocks"]}
    result_alphas: dict[str, Any] = {}
    for alpha in data["alphas"]:
        arm = data["arms"][str(alpha)]
        complied = torch.tensor([row.complied for row in arm["behaviour"]])
        blocks: dict[str, Any] = {}
        for index, block in enumerate(data["readout_blocks"]):
            entry: dict[str, Any] = {}
            for position in POSITIONS:
                steered, unsteered = _states(arm, position)[:, index], _states(base, position)[:, index]
                valid = ~(steered.isnan().any(-1) | unsteered.isnan().any(-1))  # rows that produced tokens
                if int(valid.sum()) < 2:
                    entry[position] = {"n_prompts": int(valid.sum()), "note": "fewer than 2 prompts produced tokens"}
                    continue
                stats = motion_stats(steered[valid], unsteered[valid], axes[first], axes[block], B=B,
                                     seed=data["seed"])
                u = stats.pop("u")
                tensors[f"{'u' if position == 'generated' else 'u_last'}/{alpha:g}/{block}"] = u.contiguous()
                chosen = complied & valid
                stats["compliance_destination_deg"] = (
                    compliance_destination(steered[chosen], unsteered[valid], axes[block]) if chosen.any() else None)
                stats["n_complied"] = int(chosen.sum())
                entry[position] = stats
            blocks[str(block)] = entry
        result_alphas[f"{alpha:g}"] = {"steering": arm["steering"], "rates": _rates(data, arm), "blocks": blocks}
    result = {"schema_version": SCHEMA_VERSION, "analysis": "motion", "conventions": _conventions(data),
              "seed": data["seed"], "B": B, "k": data["k"], "n_prompts": len(data["prompts"]), "d_model": lm.d_model,
              "steered_blocks": data["steered_blocks"], "readout_blocks": data["readout_blocks"],
              "unsteered_rates": _rates(data, base), "method": data["method"], "alphas": result_alphas}
    atomic_write_bytes(run.root / "analysis" / "motion.safetensors",
                       save(tensors, metadata={"layer_indexing": LAYER_INDEXING, "component": "resid"}))
    atomic_write_json(run.analysis_path("motion"), result)
    return result


def run_hedge(run_dir: Path, lm: LoadedModel, *, B: int = 1000, P: int = 1000, m: int = MIN_GROUP,
              n_random: int = 10, **sweep_options: Any) -> dict[str, Any]:
    """Hedge geometry of the steered decoding-time states, pooled over the sweep: ``analysis/hedge.json``.

    Groups come from each steered response's corrected label (:func:`hedge_group`); the states
    are the ``generated`` position at each readout block (rows that produced no token are left
    out). The causal test (:func:`torsion.analysis.hedge_causal.causal_hedge_test`) steers along
    ``h − a`` at the last readout block with geometry, at the mean applied norm of the α that
    produced the most hedges, against ``n_random`` random directions (``n_random = 0`` skips it).
    """
    run = RunDir(run_dir)
    data = sweep(run.root, lm, **sweep_options)
    arms = [data["arms"][str(alpha)] for alpha in data["alphas"]]
    labels = [hedge_group(row) for arm in arms for row in arm["behaviour"]]
    per_alpha = {f"{alpha:g}": {g: sum(hedge_group(row) == g for row in data["arms"][str(alpha)]["behaviour"])
                                for g in ("refused", "strong_comply", "hedge")} for alpha in data["alphas"]}
    blocks: dict[str, Any] = {}
    hedge_direction: tuple[int, Tensor] | None = None
    for index, block in enumerate(data["readout_blocks"]):
        states = torch.cat([_states(arm, "generated")[:, index] for arm in arms])  # [n_alphas * n_prompts, d]
        valid = ~states.isnan().any(-1)
        groups = [g if ok else "no_tokens" for g, ok in zip(labels, valid.tolist())]
        blocks[str(block)] = hedge_geometry_test(torch.nan_to_num(states), groups, B=B, P=P, m=m, seed=data["seed"])
        if blocks[str(block)]["geometry"] == "ok":
            chosen = torch.tensor([g == "hedge" for g in groups]), torch.tensor([g == "refused" for g in groups])
            hedge_direction = (block, states[chosen[0]].double().mean(0) - states[chosen[1]].double().mean(0))
    result = {"schema_version": SCHEMA_VERSION, "analysis": "hedge", "conventions": _conventions(data),
              "groups": {"a": "refused (strong or weak refuse, fp_refuse)", "b": "strong_comply",
                         "h": "hedge (weak_comply)", "correction": "fp_refuse and fp_echo complies are not b or h"},
              "pooled_over_alphas": [f"{a:g}" for a in data["alphas"]], "counts_per_alpha": per_alpha,
              "seed": data["seed"], "B": B, "P": P, "m": m, "steered_blocks": data["steered_blocks"],
              "blocks": blocks,
              "causal_test": _causal(lm, data, hedge_direction, per_alpha, n_random)}
    atomic_write_json(run.analysis_path("hedge"), result)
    return result


def _causal(lm: LoadedModel, data: dict[str, Any], hedge_direction: tuple[int, Tensor] | None,
            per_alpha: dict[str, dict[str, int]], n_random: int) -> dict[str, Any]:
    """The causal hedge test's result, or why it did not run."""
    from torsion.analysis.hedge_causal import causal_hedge_test

    if hedge_direction is None:
        return {"run": False, "note": "no readout block has hedge geometry (a group below m), so there is no h - a"}
    if n_random < 1:
        return {"run": False, "note": "skipped (n_random = 0)"}
    alpha = max(data["alphas"], key=lambda a: per_alpha[f"{a:g}"]["hedge"])
    steering = data["arms"][str(alpha)]["steering"]
    deltas = steering.get("mean_delta_norm")  # replacement methods: what they changed, not their additive term
    applied_norm = float(np.mean(deltas if deltas and None not in deltas else steering["applied_norm"]))
    block, direction = hedge_direction
    result = causal_hedge_test(lm, data["prompts"], data["arms"]["unsteered"]["behaviour"], direction,
                               judge=data["judge_object"], block=block,
                               applied_norm=applied_norm, n_random=n_random, settings=data["settings"],
                               positions=data["positions"], seed=data["seed"])
    return {"run": True, "norm_from_alpha": f"{alpha:g}", "note": "applied norm = mean ||alpha v_l|| of that alpha "
            "(replacement methods: mean ||h' - h||)",
            **result}


def hedge_group(row: Corrected) -> str:
    """``refused`` (strong or weak refuse, or an fp_refuse), ``strong_comply`` or ``hedge`` (weak comply)
    that the false-positive correction keeps, else ``other``."""
    if row.refused:
        return "refused"
    if row.correction is None and row.label in ("strong_comply", "weak_comply"):
        return "strong_comply" if row.label == "strong_comply" else "hedge"
    return "other"


def _rates(data: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    rates = class_rates(data["prompts"], arm["responses"], arm["labels"])
    return {name: rates[name] for name in ("refused", "complied", "strong_comply", "weak_comply", "degenerate")}
