"""Reading a run directory's labelled prompts: the one place that decides which rows enter a fit.

Each response row read here carries its behaviour after false-positive correction and human
review (methods.md, "Behaviour labels"): ``correction`` (as recorded in ``responses.jsonl``, or
computed on read for a run written before the field existed) and ``review`` (the latest decision
in ``review.jsonl``, or None). :func:`row_behaviour` turns such a row into a
:class:`~torsion.judge.correction.Corrected` through the one correction function.

Example::

    prompts, responses = labelled_prompts(RunDir("runs/quick"))
    rows = fit_rows(prompts, responses)          # train split, refused or complied after correction
    scores = fit_scores(responses, rows)         # +0.5 for an fp_refuse, the judge's score otherwise
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor

from torsion.capture import load_activations
from torsion.data import Prompt, assign_split, load_source, read_prompts_jsonl
from torsion.errors import TorsionError
from torsion.judge import get_judge
from torsion.judge.base import LABELS, Judge
from torsion.judge.correction import CORRECTIONS, Corrected, corrected_row, row_correction
from torsion.review.decisions import read_decisions
from torsion.store import RunDir

JUDGE_FAMILIES = ("rules", "learned", "ensemble", "probe", "llm")  # get_judge names; a recorded judge name is
# "<family>-<version>" (learned: "learned-v1:<training sha256[:12]>") or "llm:<model>"


def labelled_prompts(run: RunDir) -> tuple[list[Prompt], list[dict]]:
    """Prompts and their judged responses, in ``prompts.jsonl`` order, each row with ``correction``
    and ``review`` filled in (see the module docstring)."""
    prompts = read_prompts_jsonl(run.prompts_path)
    by_id = {row["id"]: row for row in run.responses()}
    missing = [p.id for p in prompts if p.id not in by_id]
    if missing and run.stage_done("generate"):  # generation finished: the files disagree, rerunning adds nothing
        raise TorsionError(f"{len(missing)} prompts of {run.root} have no response (e.g. {missing[0]}) although "
                           f"its generate stage is done: {run.prompts_path.name} or {run.responses_path.name} was "
                           "changed; restore them, or run again into a new directory")
    if missing:
        raise TorsionError(f"{len(missing)} prompts of {run.root} have no response yet (e.g. {missing[0]}); "
                           "finish the run with `torsion run` on the same directory")
    decisions = read_decisions(run.root)
    rows = []
    for p in prompts:
        row = by_id[p.id]
        if row["label"] not in LABELS or row.get("correction") not in CORRECTIONS:
            raise TorsionError(f"{run.responses_path} row {p.id!r} has label {row['label']!r} and correction "
                               f"{row.get('correction')!r}; labels are {', '.join(LABELS)} and corrections null, "
                               "fp_refuse or fp_echo: fix that line")
        correction = row["correction"] if "correction" in row else row_correction(p.prompt, row["response"],
                                                                                   row.get("score"))
        rows.append({**row, "correction": correction, "review": decisions.get(p.id)})
    return prompts, rows


def neutral_halves(run: RunDir) -> tuple[list[Prompt], list[Prompt]]:
    """The shipped neutral set split in two by the run's seed, stratified by topic: (search probe,
    held-out probe). Prompts that are also in the run (a run may use the neutral source) are
    left out of both, so no prompt that fit a vector is a probe."""
    in_run = {p.prompt_hash for p in read_prompts_jsonl(run.prompts_path)}
    neutral = [p for p in load_source("neutral") if p.prompt_hash not in in_run]
    if len(neutral) < 2:
        raise TorsionError("the run uses the neutral prompts itself, so none is left for the KL probes; "
                           "run without the neutral source")
    halves = assign_split(neutral, holdout_fraction=0.5, seed=int(run.manifest().get("seed", 0)))
    return [p for p in halves if p.split == "train"], [p for p in halves if p.split == "holdout"]


def run_activations(run: RunDir, component: str = "resid") -> tuple[Tensor, dict[str, str]]:
    """One component of the run's ``activations.safetensors``, ``[n_prompts, n_layers, d_model]`` in
    ``prompts.jsonl`` order, and the file's metadata; one line if the capture is missing or stale."""
    if not run.activations_path.is_file():
        raise TorsionError(f"{run.activations_path} not found; finish the run (capture stage) first")
    tensors, meta = load_activations(run.activations_path)
    if component not in tensors:
        raise TorsionError(f"activations have no component {component!r}; choose one of {', '.join(sorted(tensors))}")
    n_prompts = len(read_prompts_jsonl(run.prompts_path))
    if tensors[component].shape[0] != n_prompts:
        raise TorsionError(f"activations have {tensors[component].shape[0]} rows but the run has {n_prompts} "
                           "prompts; re-run the capture stage")
    return tensors[component], meta


def row_behaviour(row: dict) -> Corrected:
    """A row of :func:`labelled_prompts` after correction and review."""
    return corrected_row(row, decision=row.get("review"))


def fit_rows(prompts: list[Prompt], responses: list[dict], *, category: str | None = None) -> list[int]:
    """Indices of train-split rows that enter a fit: refused or complied after correction and review
    (degenerate, fp_echo and judge errors never fit). ``category`` keeps that category's rows only."""
    return [i for i, (p, r) in enumerate(zip(prompts, responses))
            if p.split == "train" and (category is None or p.category == category) and row_behaviour(r).fits]


def fit_scores(responses: list[dict], rows: list[int]) -> list[float]:
    """The corrected score of each fit row (an fp_refuse counts as refused, +0.5)."""
    return [float(row_behaviour(responses[i]).score) for i in rows]


def recorded_judge(responses: list[dict]) -> str:
    """The name of the judge that labelled a run's responses (``rules-v2``, ``llm:<model>``)."""
    names = Counter(str(r.get("judge", "unknown")) for r in responses)
    if len(names) != 1:
        raise TorsionError(f"the run's responses were labelled by several judges ({dict(names)}); "
                           "re-judge them with one judge, or pass --judge")
    return next(iter(names))


def judge_from_name(recorded: str, **options) -> Judge:
    """Rebuild the judge a row or a result file names: ``rules-<version>`` is the rule judge (this
    torsion's version of it), ``llm:<model>`` the LLM judge of that model (``options`` go to
    :func:`get_judge`: ``base_url``, ``api_key_env``, ...)."""
    if recorded.startswith("llm:"):
        return get_judge("llm", **{"model": recorded.removeprefix("llm:"), **options})
    if recorded.split("-")[0] == "rules":
        return get_judge("rules", **options)
    if recorded.split("-")[0] in ("learned", "ensemble", "probe"):
        judge = get_judge(recorded.split("-")[0], **options)
        if judge.name != recorded:
            raise TorsionError(f"the responses were labelled by {recorded!r} but these weights give {judge.name!r}; "
                               "pass the weights that labelled them, or re-judge the run (torsion judge rejudge)")
        return judge
    raise TorsionError(f"the responses were labelled by {recorded!r}, which torsion cannot rebuild; "
                       "pass --judge rules or --judge llm (library: pass judge=)")


def run_judge(run: RunDir, name: str | None = None, **options) -> Judge:
    """The judge a search or evaluation on ``run`` labels with: the run's own (the one recorded in
    ``responses.jsonl``) unless ``name`` (``rules`` or ``llm``) says otherwise. An LLM judge takes
    its model from the run's labels unless ``options`` give ``model=``."""
    if name is None:
        return judge_from_name(recorded_judge(run.responses()), **options)
    if name not in JUDGE_FAMILIES:
        raise TorsionError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGE_FAMILIES)}")
    if name == "llm" and "model" not in options:
        recorded = recorded_judge(run.responses())
        if not recorded.startswith("llm:"):
            raise TorsionError(f"{run.root} was labelled by {recorded!r}, not an LLM judge, so there is no model "
                               "to rebuild; pass the LLM judge's model (library: run_judge(run, 'llm', model=...))")
        return judge_from_name(recorded, **options)
    return get_judge(name, **options)
