"""TPE against NSGA-II for the multi-objective refusal/KL search, on a cheap proxy of the real problem.

The proxy keeps the real search's machinery and space and replaces only the expensive judge: a
randomly initialised 12-block Llama (d_model 64), two prompt groups ("harmful": prompts built
from one half of the vocabulary, "neutral": the other half), the per-block mean-difference
direction between them (after block 5: of what blocks 6 … l wrote), and a linear-probe "judge" of what the
late blocks write: a harmful
train prompt counts as refused when ``h_10 − h_5`` (last token, steered; block outputs, before
the final norm) projects on the unit mean difference of that quantity above the midpoint of the
two groups' unsteered means. (A probe on the final state alone does not move: in a random model
the groups differ mostly by their embeddings, which a late kernel never touches.) The second objective is torsion's
first-token KL (base→steered) on neutral probe prompts. Each trial samples the real space
(:func:`torsion.optimize_multi.kernel_space`, :func:`~torsion.optimize_multi.suggest`) with the
real study machinery (:func:`torsion.search.open_study` with the real samplers) for ``--trials``
trials; the score is the front's hypervolume against the real reference point (1, 1), over
``--seeds`` seeds per sampler. Random search (Optuna's RandomSampler, same study otherwise) is
the baseline; the result file holds each sampler's hypervolumes and its ratio to random.

    python benchmarks/bench_multi_sampler.py [--trials 24] [--seeds 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_result  # noqa: E402
from torsion.capture import encode  # noqa: E402
from torsion.metrics import first_token_kl  # noqa: E402
from torsion.optimize_multi import REFERENCE_POINT, kernel_space, method_params, suggest  # noqa: E402
from torsion.pareto import hypervolume_2d  # noqa: E402
from torsion.search import open_study, run_worker  # noqa: E402
from torsion.steering import get_method  # noqa: E402

N_LAYERS, D_MODEL = 12, 64
PROBE_FROM, PROBE_TO = 5, 10  # the probe reads h_10 − h_5 (block 11's output is not read: it is normed next)


def proxy_model():
    """A random Llama and a word-level chat tokenizer (as the tests build them), seeded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from torsion.models import LoadedModel, find_layout

    words = [f"w{i}" for i in range(40)]
    special = ["<pad>", "<unk>", "<eos>", "<user>", "<end>", "<assistant>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} <end> {% endfor %}"
                               "{% if add_generation_prompt %}<assistant> {% endif %}")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(special) + len(words), hidden_size=D_MODEL, intermediate_size=128,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, find_layout(model), "proxy:llama12", "proxy-llama12", None), words


def prompts(words: list[str], n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=generator).tolist())
            for _ in range(n)]


@torch.inference_mode()
def last_states(lm, texts: list[str], steer=None) -> torch.Tensor:
    """``[n, n_layers, d]`` block outputs at the last prompt token (optionally steered)."""
    inputs = encode(lm, texts)
    context = steer() if steer is not None else torch.no_grad()
    with context:
        out = lm.model(**inputs, output_hidden_states=True)
    return torch.stack(out.hidden_states[1:], dim=1)[:, :, -1].float()


def late_write(states: torch.Tensor) -> torch.Tensor:
    """What blocks 6 … 10 added to the residual stream at the last token, ``[n, d]``."""
    return states[:, PROBE_TO] - states[:, PROBE_FROM]


def study_hypervolume(lm, sampler: str, seed: int, n_trials: int, setting: dict) -> float:
    space = kernel_space(N_LAYERS)
    directions, unit, threshold = setting["directions"], setting["unit"], setting["threshold"]

    def objective(trial):
        method = get_method("weighted-ablation", directions=directions, **method_params(suggest(trial, space)))
        steer = method.factory(lm, 1.0)
        projected = late_write(last_states(lm, setting["harmful"], steer)) @ unit
        refusal = float((projected > threshold).float().mean())
        return refusal, first_token_kl(lm, setting["neutral"], steer)["kl_base_to_steered"]

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        kind = "tpe" if sampler == "random" else sampler
        study = open_study(url, "bench", {"proxy": True}, n_trials=n_trials, sampler=kind, seed=seed,
                           directions=("minimize", "minimize"))
        if sampler == "random":
            import optuna

            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        summary = run_worker(study, objective)
    values = [t["values"] for t in summary["trials"] if t["state"] == "COMPLETE"]
    return hypervolume_2d([tuple(v) for v in values], REFERENCE_POINT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm, words = proxy_model()
    harmful_words, neutral_words = words[:20], words[20:]
    harmful, neutral = prompts(harmful_words, 48, 1), prompts(neutral_words, 48, 2)
    h, n = last_states(lm, harmful), last_states(lm, neutral)
    relative = torch.cat([h[:, :PROBE_FROM + 1], h[:, PROBE_FROM + 1:] - h[:, PROBE_FROM:PROBE_FROM + 1]], dim=1)
    relative_n = torch.cat([n[:, :PROBE_FROM + 1], n[:, PROBE_FROM + 1:] - n[:, PROBE_FROM:PROBE_FROM + 1]], dim=1)
    directions = relative.mean(0) - relative_n.mean(0)  # [n_layers, d]: after block 5, what blocks 6.. l wrote
    write_difference = late_write(h).mean(0) - late_write(n).mean(0)
    unit = write_difference / write_difference.norm()
    threshold = float(((late_write(h) @ unit).mean() + (late_write(n) @ unit).mean()) / 2)
    setting = {"directions": directions, "unit": unit, "threshold": threshold, "harmful": harmful[:24],
               "neutral": prompts(neutral_words, 16, 3)}
    base_refusal = float(((late_write(h[:24]) @ unit) > threshold).float().mean())
    results, seconds = {}, {}
    for sampler in ("random", "tpe", "nsga2"):
        start = time.perf_counter()
        results[sampler] = [study_hypervolume(lm, sampler, seed, args.trials, setting) for seed in range(args.seeds)]
        seconds[sampler] = round(time.perf_counter() - start, 1)
        print(sampler, [round(v, 4) for v in results[sampler]], f"{seconds[sampler]} s", flush=True)
    summary = {name: {"hypervolumes": [round(v, 5) for v in values], "mean": statistics.mean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "ratio_to_random": statistics.mean(values) / statistics.mean(results["random"]),
                      "wins_against_random": sum(v > r for v, r in zip(values, results["random"])),
                      "seconds": seconds[name]} for name, values in results.items()}
    paired = [t - g for t, g in zip(results["tpe"], results["nsga2"])]
    verdict = "tpe" if statistics.mean(paired) > 0 else "nsga2"
    write_result("multi_sampler", {
        "setting": {"model": f"random Llama, {N_LAYERS} blocks, d_model {D_MODEL}", "trials": args.trials,
                    "seeds": args.seeds, "harmful_train_prompts": 24, "neutral_probe_prompts": 16,
                    "judge": "linear probe on h_10 - h_5 (proxy)", "unsteered_refusal": base_refusal,
                    "reference_point": list(REFERENCE_POINT), "nsga2_population": 8},
        "samplers": summary, "baseline": "random", "tpe_minus_nsga2_per_seed": [round(d, 5) for d in paired],
        "tpe_wins": sum(d > 0 for d in paired), "verdict": verdict,
        "note": "a proxy: the real study's space, samplers and hypervolume, with a probe in place of generation "
                "and the judge; the real comparison is the lead's 24-trial run on the embedded Qwen model"})


if __name__ == "__main__":
    main()
