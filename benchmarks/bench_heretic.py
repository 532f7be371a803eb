"""Refusal removal head to head: torsion's multi-objective weighted ablation against heretic 1.4.0.

Both tools search the same model (the embedded Qwen, float32, the cached Hugging Face
directory), on the same train prompts, with the same trial budget (``--trials``, default 24)
and the same generation length; then every point of both Pareto fronts is evaluated by ONE
evaluator on the SAME held-out prompts of the torsion run.

Sides:

- **torsion**: ``torsion optimize RUN --method weighted-ablation --objective comply --multi
  --trials N --n-prompts P --n-kl-prompts K --study S`` (a subprocess; its front is
  ``RUN/analysis/front_<S>.json``), then each front point is baked into weights with
  ``torsion orthogonalize --from-study RUN/S --pick INDEX --out DIR``. torsion's search
  generates the run's own length (``max_new_tokens`` of its manifest; ``optimize`` has no flag).
- **heretic**: its CLI in its own virtualenv, ``<repo>/.venv-heretic`` (built on first use from
  ``heretic_requirements.txt``; torch first, exact, as the CPU build on disk), run offline
  (``HF_HUB_OFFLINE``) in ``WORK/heretic`` with a ``config.toml``: the cached model directory,
  ``dtypes = ["float32"]``, ``device_map = "cpu"``, batch size 8, ``max_response_length`` the
  generation length, ``n_trials`` the budget, ``n_startup_trials`` heretic's 60/200 share of it
  (its default 60 would leave a 24-trial budget all random), the system prompt Qwen's own
  default (so heretic sees the token ids torsion's chat prompt makes), and four plain-text
  prompt files (one prompt a line) taken from the torsion run: ``bad_prompts`` = every
  train-split harmful prompt, ``good_prompts`` = the search half of the neutral set (the half
  torsion's KL probe samples), ``bad_evaluation_prompts`` = torsion's per-trial search sample
  (``--n-prompts``), ``good_evaluation_prompts`` = torsion's KL probe (``--n-kl-prompts``).
  heretic's own defaults stay: row-norm-preserving LoRA abliteration of ``o_proj`` and
  ``down_proj``, the projected refusal direction, its refusal markers, its two-objective TPE.
  Its end-of-run menu is interactive; the CLI is run with ``COLAB_GPU=1`` (heretic then reads
  plain ``input()``) and stdin answering ``1`` to its resume question only, so the menu meets
  end of file and the process ends after the study is stored. ``heretic_worker.py front`` (in
  the same venv) then takes heretic's Pareto front from the journal and re-applies each point with
  heretic's own ``Model.abliterate``, saving the LoRA factors it sets.

Why heretic's points are re-applied by heretic's code and not translated into torsion's
``weighted-ablation``: the kernels do not match. heretic edits weights with row-norm
preservation (``row_normalization = "full"``: renormalised rows, a rank-3 LoRA approximation),
ablates a direction made orthogonal to the harmless mean, computed from harmful-vs-harmless
means at the first generated position; torsion's kernel is an exact partial projection
``W - w_l v v^T W`` of a refused-vs-complied direction. A translation would evaluate a
different model than the one heretic chose.

The evaluator (this process, torsion's venv): for every point, a model = the base with the
point's weight edit (heretic: ``W + lora_B @ lora_A`` on each adapted module; torsion: the
tensors ``orthogonalize`` changed), then ``torsion.behaviour.evaluate_behaviour`` on the held-out
harmful prompts (greedy, the generation length, judged by the run's judge, ``rules``) and
``torsion.metrics.first_token_kl``'s formula on the held-out neutral probe (``kl_eval``), base
against edited. Each response is also labelled by heretic's own ``Evaluator.is_refusal`` with its
default refusal markers (``heretic_worker.py refusals``, in its venv). Hypervolume (``torsion.pareto.hypervolume_2d``) of
each front in the plane
(held-out refusal rate, held-out KL base→edited), both minimised, against one reference point,
torsion's front files' own (1, 1): every prompt refused, a KL past any usable model (a point
beyond it adds nothing); also against (1, 1.1 × the largest KL of any point), which counts every
point. Wall time per trial: start to finish of each complete trial, from each tool's Optuna
storage (heretic's journal, torsion's SQLite), so model loading and set-up are left out of both;
each tool's whole wall time is recorded too.

Result ``results/heretic.json``:

- ``settings``: run, trials, n_prompts, n_kl_prompts, n_holdout, max_new_tokens (evaluation and
  heretic search), torsion_search_max_new_tokens, seed, study, machine;
- ``prompts``: counts and sha256 of the prompt ids of each set (train bad, good, search, KL
  probe, held-out harmful, held-out neutral);
- ``heretic``: ``status`` (ok / failed), ``failure`` {command, error} when it failed, ``config``
  (heretic's stored settings), ``wall_s`` (CLI), ``trial_seconds`` (per trial, from its journal),
  ``seconds_per_trial`` (mean), ``base_refusals``;
- ``torsion``: the same fields, ``command``, ``front_file``, ``hypervolume_reported`` and
  ``reference_point`` (the front file's own);
- ``fronts``: ``{tool: [point]}``, a point = ``params``, ``train`` (each tool's own search
  numbers; heretic's also ``kl_reapplied``, this process's KL of the re-applied edit on heretic's
  own probe prompts, to compare with the ``kl`` heretic reported), ``heldout``: ``refusal_rate``
  (torsion judge, refused/judged), ``refusal_ci`` (Wilson 95%), ``genuine_rate``, ``degenerate_rate``, ``complied_rate``, ``n``,
  ``heretic_marker_refusal_rate`` (heretic's markers on the same responses),
  ``kl_base_to_steered``, ``kl_steered_to_base`` (mean nats, first token, held-out neutral);
- ``baseline_heldout``: the unedited model under the same evaluator;
- ``hypervolume``: ``reference_point`` (1, 1), ``{tool: value}``, ``ratio_torsion_over_heretic``,
  and ``covering_every_point`` (the same against (1, 1.1 × the largest KL));
- ``verdict``: heretic's lowest held-out refusal rate (torsion judge), heretic's lowest KL at
  that rate, torsion's lowest KL among its points at or below that rate (None if none reaches
  it), ``torsion_lower_kl`` (bool or None), and the same with heretic's markers as the refusal
  measure.

Usage: ``python benchmarks/bench_heretic.py [--run RUN_DIR] [--trials 24] [--n-prompts 24]
[--n-kl-prompts 16] [--n-holdout N] [--max-new-tokens T]``; a bounded try: ``--trials 2
--n-prompts 8 --n-kl-prompts 8 --n-holdout 8 --max-new-tokens 16``. Work files (prompt files,
heretic's journal and LoRA factors) live in ``<repo>/.cache/bench_heretic/<settings hash>``; a
killed run resumes there (heretic's journal resumes its study; torsion's study resumes in the
run's storage; finished evaluations are kept in ``WORK/eval_heretic_<trial>.json`` and
``WORK/eval_torsion_<study>_<point>.json``; the torsion study is named after the settings and a
hash of the search space, so a changed space is a new study).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERETIC_VENV = REPO / ".venv-heretic"
HERETIC_PYTHON = HERETIC_VENV / "bin" / "python"
HERETIC_STAMP = HERETIC_VENV / ".heretic-installed"
REQUIREMENTS = Path(__file__).with_name("heretic_requirements.txt")
WORKER = str(Path(__file__).with_name("heretic_worker.py"))
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HERETIC_STARTUP_SHARE = 60 / 200  # heretic's default n_startup_trials over its default n_trials
GENERATION_BATCH = 8
REFERENCE_POINT = (1.0, 1.0)  # torsion's front files' own: every prompt refused, a KL past any usable model
DEFAULT_RUN = REPO / "runs" / "qwen2.5-coder-0.5b-quick"  # what `make run` writes

sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import write_result  # noqa: E402

from torsion.behaviour import evaluate_behaviour  # noqa: E402
from torsion.generate import GenerationSettings  # noqa: E402
from torsion.metrics import kl_divergence, next_token_logprobs  # noqa: E402
from torsion.models import LoadedModel, find_layout, load_model  # noqa: E402
from torsion.optimize import SearchSettings, prompt_sets  # noqa: E402
from torsion.optimize_multi import kernel_space  # noqa: E402
from torsion.runs import labelled_prompts, neutral_halves, run_judge  # noqa: E402
from torsion.search import storage_url  # noqa: E402
from torsion.store import RunDir, atomic_write_json  # noqa: E402


def heretic_venv() -> Path:
    """``.venv-heretic``'s python, building the venv first if needed."""
    if not HERETIC_STAMP.exists():
        subprocess.run([sys.executable, "-m", "venv", str(HERETIC_VENV)], check=True)
        pip = [str(HERETIC_PYTHON), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first and exact: a range pulls CUDA
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        HERETIC_STAMP.touch()
    return HERETIC_PYTHON


def sha(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def write_lines(path: Path, prompts: list) -> None:
    texts = [p.prompt for p in prompts]
    bad = [t for t in texts if "\n" in t or not t.strip()]
    if bad:
        raise SystemExit(f"heretic reads one prompt a line; {len(bad)} prompts hold a newline or are empty")
    path.write_text("".join(t.strip() + "\n" for t in texts), encoding="utf-8")


def toml_value(value) -> str:
    return json.dumps(value)  # strings, numbers, lists of strings: TOML accepts JSON's forms


def heretic_config(model_dir: Path, files: dict[str, Path], args) -> str:
    startup = max(1, round(args.trials * HERETIC_STARTUP_SHARE))
    lines = [f"model = {toml_value(str(model_dir))}", 'dtypes = ["float32"]', 'device_map = "cpu"',
             f"batch_size = {GENERATION_BATCH}", f"max_response_length = {args.max_new_tokens}",
             f"n_trials = {args.trials}", f"n_startup_trials = {startup}", f"seed = {args.seed}",
             f"system_prompt = {toml_value(QWEN_SYSTEM)}", 'study_checkpoint_dir = "checkpoints"',
             'export_strategy = "adapter"']
    for name, path in files.items():
        lines += ["", f"[{name}]", f"dataset = {toml_value(str(path))}"]
    return "\n".join(lines) + "\n"


def run_heretic(work: Path, model_dir: Path, sets: dict, args) -> dict:
    """heretic's CLI, then its front re-applied by ``heretic_worker.py front``; a failure is recorded, not raised."""
    hdir = work / "heretic"
    hdir.mkdir(parents=True, exist_ok=True)
    files = {"bad_prompts": hdir / "bad_train.txt", "good_prompts": hdir / "good_train.txt",
             "bad_evaluation_prompts": hdir / "bad_search.txt", "good_evaluation_prompts": hdir / "good_probe.txt"}
    for name, key in (("bad_prompts", "train"), ("good_prompts", "neutral_search_half"),
                      ("bad_evaluation_prompts", "search"), ("good_evaluation_prompts", "kl_probe")):
        write_lines(files[name], sets[key])
    (hdir / "config.toml").write_text(heretic_config(model_dir, files, args))
    export_dir = hdir / "front"
    record: dict = {"status": "ok", "venv": str(HERETIC_VENV)}
    python = heretic_venv()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COLAB_GPU": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    command = [str(python.with_name("heretic"))]
    done = hdir / "optimize.done"
    if not done.exists():
        resume = any((hdir / "checkpoints").glob("*.jsonl"))
        start = time.perf_counter()
        with open(hdir / "heretic.log", "a") as log:
            proc = subprocess.run(command, cwd=hdir, env=env, input="1\n" if resume else "", text=True,
                                  stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        text = (hdir / "heretic.log").read_text(errors="replace")
        if "Optimization finished!" not in text.split("Running trial")[-1]:
            error = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
            record.update(status="failed", failure={"command": " ".join(command) + f"  (cwd {hdir})",
                                                    "returncode": proc.returncode, "error": error[0]})
            return record
        atomic_write_json(done, {"wall_s": wall, "returncode": proc.returncode})
    record["wall_s"] = json.loads(done.read_text())["wall_s"]
    if not (export_dir / "front.json").exists():
        proc = subprocess.run([str(python), WORKER, "front",
                               str(hdir), str(export_dir)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            error = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
            record.update(status="failed", failure={"command": f"{python} {WORKER} front {hdir} {export_dir}",
                                                    "error": error[0]})
            return record
    front = json.loads((export_dir / "front.json").read_text())
    seconds = front["trial_seconds"]
    record.update(config=front["settings"], trial_seconds=seconds, base_refusals=front["base_refusals"],
                  seconds_per_trial=sum(seconds) / len(seconds) if seconds else None,
                  points=[{**p, "file": str(export_dir / p["file"])} for p in front["front"]])
    return record


def heretic_refusals(work: Path, responses: list[str]) -> list[bool]:
    """heretic's own ``Evaluator.is_refusal`` on each response (run in its venv)."""
    given, verdicts = work / "marker_input.json", work / "marker_output.json"
    given.write_text(json.dumps(responses))
    subprocess.run([str(heretic_venv()), WORKER, "refusals", str(given), str(verdicts)], check=True,
                   capture_output=True)
    return json.loads(verdicts.read_text())


def torsion_cli() -> list[str]:
    return [sys.executable, "-m", "torsion.cli"]


def run_torsion(run_dir: Path, work: Path, study: str, args) -> dict:
    """``torsion optimize --multi``, then each front point baked by ``orthogonalize --from-study``."""
    command = [*torsion_cli(), "optimize", str(run_dir), "--method", "weighted-ablation", "--objective", "comply",
               "--multi", "--trials", str(args.trials), "--n-prompts", str(args.n_prompts),
               "--n-kl-prompts", str(args.n_kl_prompts), "--seed", str(args.seed), "--study", study]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    record: dict = {"status": "ok", "command": " ".join(command)}
    front_file = RunDir(run_dir).analysis_path(f"front_{study}")
    timing = work / "torsion_optimize.json"
    if not (front_file.is_file() and timing.exists()):
        start = time.perf_counter()
        proc = subprocess.run([*command], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not front_file.is_file():
            error = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
            record.update(status="failed", failure={"command": " ".join(command), "returncode": proc.returncode,
                                                    "error": error[0] if error else f"exit {proc.returncode}"})
            return record
        atomic_write_json(timing, {"wall_s": time.perf_counter() - start})
    record["wall_s"] = json.loads(timing.read_text())["wall_s"]
    front = json.loads(front_file.read_text())
    seconds = trial_seconds(storage_url(run_dir, None), study)
    record.update(front_file=str(front_file), trial_seconds=seconds,
                  seconds_per_trial=sum(seconds) / len(seconds) if seconds else None,
                  hypervolume_reported={k: v for k, v in front.items() if k.startswith("hypervolume")},
                  reference_point=front.get("reference_point"),
                  points=[])
    for index, point in enumerate(front.get("points", front.get("front", []))):
        out = work / "torsion_models" / f"{study}_point_{index}"
        record["points"].append({"index": index, "params": point.get("params"), "train": point.get("train"),
                                 "heldout_reported": point.get("heldout"), "model_dir": str(out),
                                 "export": [*torsion_cli(), "orthogonalize", "--from-study", f"{run_dir}/{study}",
                                            "--pick", str(index), "--out", str(out)]})
    return record


def trial_seconds(url: str, study: str) -> list[float]:
    """Start to finish of every complete trial of an Optuna study (as heretic's journal gives them)."""
    import optuna

    trials = optuna.load_study(study_name=study, storage=url).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]


def edited_copy(base: LoadedModel, edit) -> LoadedModel:
    """A deep copy of ``base`` whose weights ``edit(named_parameters)`` changed in place."""
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        edit(dict(model.named_parameters()))
    edited = LoadedModel(model=model, tokenizer=base.tokenizer, layout=find_layout(model), spec=base.spec,
                         model_id=base.model_id, weights_sha256=None)
    return edited


def heretic_edit(path: str):
    from safetensors.torch import load_file

    factors = load_file(path)

    def edit(params: dict) -> None:
        names = {key.rsplit(".lora_", 1)[0] for key in factors}
        for name in names:
            weight = params[f"{name}.weight"]
            delta = factors[f"{name}.lora_B"].double() @ factors[f"{name}.lora_A"].double()
            weight.copy_((weight.double() + delta).to(weight.dtype))
    return edit


def torsion_edit(model_dir: Path):
    from safetensors.torch import load_file

    state = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))

    def edit(params: dict) -> None:
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise SystemExit(f"{model_dir} holds tensors the base model lacks, e.g. {unknown[0]}")
        for name, weight in params.items():
            if name in state and not torch.equal(state[name].to(weight.dtype), weight):
                weight.copy_(state[name].to(weight.dtype))
    return edit


def evaluate(base: LoadedModel, edited: LoadedModel | None, sets: dict, generation: GenerationSettings,
             judge, base_logprobs: torch.Tensor) -> dict:
    """One evaluator for every point: held-out behaviour (torsion's judge and heretic's markers), KL both ways."""
    lm = edited or base
    holdout = [p.prompt for p in sets["holdout"]]
    result = evaluate_behaviour(lm, holdout, None, generation, judge=judge, desc="held-out")
    rates = result["rates"]
    steered = next_token_logprobs(lm, [p.prompt for p in sets["kl_eval"]], 16, None)
    kl_bs = kl_divergence(base_logprobs, steered)
    kl_sb = kl_divergence(steered, base_logprobs)

    refused = rates["refused"]
    return {"n": refused["n"], "refusal_rate": refused["rate"], "refusal_ci": refused["ci95"],
            "genuine_rate": rates["genuine_strong_comply"]["rate"], "degenerate_rate": rates["degenerate"]["rate"],
            "complied_rate": rates["complied"]["rate"],
            "kl_base_to_steered": kl_bs.mean().item(), "kl_steered_to_base": kl_sb.mean().item(),
            "n_kl_prompts": len(sets["kl_eval"]), "responses": result["responses"], "labels": result["labels"]}


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The 2-D dominated area (both minimised), as torsion's front files compute it."""
    from torsion.pareto import hypervolume_2d

    return hypervolume_2d(points, reference)


def ratio(volumes: dict) -> float | None:
    return volumes["torsion"] / volumes["heretic"] if volumes.get("heretic") and "torsion" in volumes else None


def verdict(fronts: dict, key: str) -> dict:
    heretic = [p["heldout"] for p in fronts.get("heretic", [])]
    torsion = [p["heldout"] for p in fronts.get("torsion", [])]
    if not heretic:
        return {"refusal_measure": key, "torsion_lower_kl": None, "reason": "no heretic point"}
    lowest = min(h[key] for h in heretic)
    heretic_kl = min(h["kl_base_to_steered"] for h in heretic if h[key] == lowest)
    reaching = [t["kl_base_to_steered"] for t in torsion if t[key] <= lowest]
    torsion_kl = min(reaching) if reaching else None
    return {"refusal_measure": key, "heretic_lowest_refusal_rate": lowest, "heretic_kl_at_lowest": heretic_kl,
            "torsion_lowest_refusal_rate": min((t[key] for t in torsion), default=None),
            "torsion_kl_at_or_below": torsion_kl,
            "torsion_lower_kl": None if torsion_kl is None else torsion_kl < heretic_kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path(os.environ.get("TORSION_BENCH_RUN", DEFAULT_RUN)),
                        help="a finished `torsion run` directory (default $TORSION_BENCH_RUN, else make run's)")
    parser.add_argument("--trials", type=int, default=24, help="trial budget of each tool (default 24)")
    parser.add_argument("--n-prompts", type=int, default=24, help="train harmful prompts per trial (default 24)")
    parser.add_argument("--n-kl-prompts", type=int, default=16, help="neutral prompts for each KL (default 16)")
    parser.add_argument("--n-holdout", type=int, default=None, help="held-out harmful prompts (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torsion", action="store_true", help="heretic's side only (torsion's front unmerged)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", torch.get_num_threads())))

    from torsion.assets import DEFAULT_MODEL, cached_hf_dir
    from torsion.data import sample

    if not (args.run / "manifest.json").is_file():
        raise SystemExit(f"bench_heretic: {args.run} is not a finished torsion run; run `make run` or pass --run DIR")
    run = RunDir(args.run)
    manifest = run.manifest()
    run_tokens = int(manifest.get("generation", manifest.get("config", {})).get("max_new_tokens", 32))
    args.max_new_tokens = args.max_new_tokens or run_tokens
    search = SearchSettings(method="weighted-ablation", n_prompts=args.n_prompts,
                            n_kl_prompts=args.n_kl_prompts, seed=args.seed)
    sets = prompt_sets(run, search)
    if args.n_holdout is not None:
        sets["holdout"] = sample(sets["holdout"], args.n_holdout, seed=args.seed)
    prompts, _ = labelled_prompts(run)
    sets["train"] = [p for p in prompts if p.split == "train"]
    sets["neutral_search_half"] = neutral_halves(run)[0]
    spec = {"run": str(run.root.resolve()), "dataset_sha256": manifest.get("dataset_sha256"), "trials": args.trials,
            "n_prompts": args.n_prompts, "n_kl_prompts": args.n_kl_prompts, "n_holdout": args.n_holdout,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    work = REPO / ".cache" / "bench_heretic" / key
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "spec.json", spec)
    # the search space's hash in the name: a changed space (a new parameter) is a new study, not a clash
    space = json.dumps(kernel_space(int(manifest["model"]["n_layers"])), sort_keys=True)
    space_tag = hashlib.sha256(space.encode()).hexdigest()[:6]
    study = f"bench-heretic-p{args.n_prompts}-k{args.n_kl_prompts}-s{args.seed}-{space_tag}"
    model_dir = cached_hf_dir(DEFAULT_MODEL)

    heretic = run_heretic(work, model_dir, sets, args)
    torsion = ({"status": "skipped", "reason": "--skip-torsion"} if args.skip_torsion
               else run_torsion(run.root, work, study, args))

    base = load_model(f"embedded:{DEFAULT_MODEL}", dtype="float32")
    judge = run_judge(run)
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=GENERATION_BATCH)
    base_logprobs = next_token_logprobs(base, [p.prompt for p in sets["kl_eval"]], 16, None)

    def on_edited(path: Path, edit, measure) -> dict:
        """``measure(model)`` of the base with ``edit`` applied (the base itself for None), cached at ``path``."""
        def compute() -> dict:
            edited = edited_copy(base, edit()) if edit is not None else None
            try:
                return measure(edited or base)
            finally:
                del edited
        return cached(path, compute)

    def point_eval(name: str, edit) -> dict:
        return on_edited(work / f"eval_{name}.json", edit,
                         lambda lm: evaluate(base, lm, sets, generation, judge, base_logprobs))

    probe = [p.prompt for p in sets["kl_probe"]]
    base_probe = next_token_logprobs(base, probe, 16, None)

    def probe_kl(name: str, edit) -> dict:
        """KL on heretic's own search probe (its ``good_evaluation_prompts``): the re-applied edit against
        the KL heretic reported, which checks that the point evaluated is the point heretic chose."""
        return on_edited(work / f"probe_{name}.json", edit, lambda lm: {"kl_base_to_steered": kl_divergence(
            base_probe, next_token_logprobs(lm, probe, 16, None)).mean().item()})

    baseline = point_eval("baseline", None)
    fronts: dict[str, list] = {}
    if heretic["status"] == "ok":
        fronts["heretic"] = []
        for p in heretic.pop("points"):
            edit = lambda p=p: heretic_edit(p["file"])  # noqa: E731
            reapplied = probe_kl(f"heretic_{p['number']}", edit)["kl_base_to_steered"]
            fronts["heretic"].append({"trial": p["number"], "params": p["abliteration_parameters"],
                                      "direction_index": p["direction_index"],
                                      "train": {**p["train"], "kl_reapplied": reapplied},
                                      "heldout": point_eval(f"heretic_{p['number']}", edit)})
    if torsion["status"] == "ok":
        fronts["torsion"] = []
        for point in torsion.pop("points"):
            out = Path(point["model_dir"])

            def export(point=point, out=out):
                if not any(out.glob("*.safetensors")):
                    proc = subprocess.run([*point["export"]], capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
                    if proc.returncode != 0:
                        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
                        raise SystemExit(f"{' '.join(point['export'])} failed: {lines[-1]}")
                return torsion_edit(out)
            heldout = point_eval(f"torsion_{study}_{point['index']}", export)
            shutil.rmtree(out, ignore_errors=True)  # 2 GB a point; the evaluation is cached
            fronts["torsion"].append({"index": point["index"], "params": point["params"], "train": point["train"],
                                      "heldout_reported_by_torsion": point["heldout_reported"], "heldout": heldout})
    evaluated = [baseline] + [p["heldout"] for points in fronts.values() for p in points]
    verdicts = iter(heretic_refusals(work, [r for e in evaluated for r in e["responses"]]))
    for entry in evaluated:
        marked = [next(verdicts) for _ in entry["responses"]]
        entry["heretic_marker_refusal_rate"] = sum(marked) / len(marked)
    for points in fronts.values():
        for p in points:
            p["heldout"] = {k: v for k, v in p["heldout"].items() if k not in ("responses", "labels")}

    def volumes(reference: tuple[float, float]) -> dict:
        return {tool: hypervolume([(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"])
                                   for p in points], reference) for tool, points in fronts.items()}

    all_kl = [p["heldout"]["kl_base_to_steered"] for points in fronts.values() for p in points]
    fixed = volumes(REFERENCE_POINT)
    covering = (1.0, 1.1 * max(all_kl)) if all_kl else None
    result = {
        "settings": {**spec, "torsion_search_max_new_tokens": run_tokens, "study": study,
                     "generation_batch_size": GENERATION_BATCH, "judge": judge.name,
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "prompts": {name: {"n": len(ps), "ids_sha256": sha([p.id for p in ps])} for name, ps in sets.items()},
        "heretic": heretic, "torsion": torsion,
        "baseline_heldout": {k: v for k, v in baseline.items() if k not in ("responses", "labels")},
        "fronts": fronts,
        "hypervolume": {"plane": "(held-out refusal rate by torsion's judge, held-out KL base->edited), minimised",
                        "reference_point": list(REFERENCE_POINT), **fixed,
                        "ratio_torsion_over_heretic": ratio(fixed),
                        "covering_every_point": {"reference_point": list(covering), **volumes(covering),
                                                 "ratio_torsion_over_heretic": ratio(volumes(covering))}
                        if covering else None},
        "verdict": {"torsion_judge": verdict(fronts, "refusal_rate"),
                    "heretic_markers": verdict(fronts, "heretic_marker_refusal_rate")},
    }
    path = write_result("heretic", result)
    print(f"wrote {path}")
    print(json.dumps({"hypervolume": result["hypervolume"], "verdict": result["verdict"]}, indent=1))


if __name__ == "__main__":
    main()
