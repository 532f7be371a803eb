"""Resumable, distributable trial bookkeeping for the strength search, on an Optuna storage.

A *study* is a budget of ``n_trials`` finished trials (complete or pruned) of one objective.
Any number of workers, on one machine or several, run :func:`run_worker` against the same
storage (SQLite in the run directory by default; any SQLAlchemy URL, such as PostgreSQL, for
workers on several machines) and share that budget:

- **Same objective scale.** The creator writes the objective's spec (what is scored, on which
  prompts, with which weights) into the study; a worker or a resume whose spec differs is
  refused (methods.md, defect 9: resume replayed trials under a different scale). The budget,
  batch size, worker count and sampler seed are not part of it: a resume may raise the budget
  (the study keeps the largest budget any worker asked for) and runs only the extra trials. A
  grid's size is part of it (its points are the curve being measured).
- **No replay.** Finished trials are never re-run or re-scored: a resumed search only adds
  the trials its budget still lacks.
- **Killed trials are retried.** Every running trial sends a heartbeat; one silent for
  ``grace_period`` seconds is failed and its parameters are queued again, so a kill mid-trial
  loses that trial's work but not its place. A trial whose worker died before its first
  heartbeat counts as silent from its start time. A worker that finds every remaining trial
  claimed waits for those to finish (or go stale) instead of starting surplus ones.
- **Grid mode** queues every grid point once, when the study is created; workers take queued
  trials first, so each point is run once whatever the number of workers.
- **Multi-objective studies** (``directions=("minimize", "minimize")``, samplers ``tpe`` or
  ``nsga2``) follow the same rules; their objective returns one value per direction, the study
  keeps every trial, and :func:`study_summary` lists the Pareto front (``best`` is then None).

Example::

    study = open_study("sqlite:///runs/quick/optimize.db", "comply-global", spec, n_trials=12, seed=0)
    summary = run_worker(study, objective)      # objective(trial) -> float, minimised
    summary["best"]["params"]
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from torsion.errors import TorsionError

SPEC_KEY = "torsion_spec"  # study user attribute: the objective's spec, written once by the creator
BUDGET_KEY = "torsion_budget"  # study user attribute: finished trials wanted (the largest any worker asked for)
# Keys a study made before the budget left the spec still holds; they are not part of the objective.
NOT_OBJECTIVE = ("n_trials", "settings.n_trials", "settings.batch_size", "settings.seed")
SURPLUS = "surplus"        # a trial asked for after the budget was claimed; closed as FAIL unevaluated
SAMPLERS = ("tpe", "grid", "nsga2")
NSGA2_POPULATION = 8  # small: a 24-trial budget is three generations (Optuna's default, 50, would be random search)
MAX_RETRY = 2  # a trial killed this many times (say, out of memory at a large alpha) is not queued again


def storage_url(run_dir: str | Path, storage: str | None) -> str:
    """The storage a study lives in: ``storage`` as given, else SQLite at ``run_dir/optimize.db``."""
    if storage:
        return storage
    return f"sqlite:///{(Path(run_dir) / 'optimize.db').resolve()}"


def grid_points(low: float, high: float, n: int) -> list[float]:
    """``n`` evenly spaced values from ``low`` to ``high`` inclusive (the dense-grid mode)."""
    if n < 1:
        raise TorsionError(f"a grid needs at least 1 point, got {n}; pass --trials 1 or more")
    if n == 1:
        return [(low + high) / 2]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def _storage(url: str, heartbeat_interval: int, grace_period: int):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                                  engine_kwargs={"pool_pre_ping": True})
        except Exception as error:  # SQLAlchemy raises many kinds; the user needs the URL and the cause
            # Workers starting together on an empty database race to create Optuna's tables; the
            # loser sees a unique-key violation and succeeds on retry, once the tables exist.
            text = f"{type(error).__name__} {str(error)[:300]}"
            racing = any(sign in text for sign in ("IntegrityError", "UniqueViolation", "already exists"))
            if not racing or attempt == attempts:
                raise TorsionError(f"cannot open the study storage {redact_url(url)} ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:200]}); check the URL, the server and the "
                                   "driver (PostgreSQL needs psycopg2: pip install psycopg2-binary)") from None
            time.sleep(0.5 * attempt)
    raise AssertionError("the loop returns or raises")


def redact_url(url: str) -> str:
    """A storage URL without its password, for messages and files."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}:***@{tail}" if has_password else url


def worker_seed(seed: int) -> int:
    """A sampler seed for a worker that joins (or resumes) a study: ``seed`` mixed with this
    process's identity, so two workers never draw the same startup values. The creator uses
    ``seed`` itself, so a search run start to finish by one worker is reproducible."""
    identity = f"{seed}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}".encode()
    return int.from_bytes(hashlib.sha256(identity).digest()[:4], "little")


def _sampler(kind: str, seed: int, n_trials: int, multi: bool = False):
    import optuna

    if kind not in SAMPLERS:
        raise TorsionError(f"unknown sampler {kind!r}; choose tpe, nsga2 or grid")
    if kind == "grid":  # workers only take queued points; no trial is ever sampled
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multi-objective: heretic's share of random startup trials (60 of 200), so the front is explored
        # before TPE models it; a 5-trial startup collapsed onto the low-KL corner in the proxy benchmark
        startup = max(1, n_trials * 3 // 10) if multi else max(1, min(5, n_trials // 2))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True,
                                          multivariate=multi)


@contextmanager
def quiet_optuna():
    """Optuna's logging at WARNING inside the block, the caller's level restored after it."""
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def open_study(url: str, name: str, spec: dict[str, Any], *, n_trials: int, param: str = "alpha",
               low: float | None = None, high: float | None = None, sampler: str = "tpe", seed: int = 0,
               prune: bool = True, directions: tuple[str, ...] = ("minimize",), heartbeat_interval: int = 10,
               grace_period: int = 60, wait_s: float = 60.0):
    """Create the study ``name`` in ``url``, or join it when it exists with the same spec.

    ``spec`` is any JSON object that fixes the objective's scale; the search range of the one
    parameter ``param`` (``low``, ``high``; a multi-objective study puts its search space in
    ``spec`` instead and passes neither), the sampler, the directions (several for a
    multi-objective study, which is never pruned) and a grid's size are added to it. ``n_trials`` is the budget, kept apart from the spec:
    joining with a larger one raises the study's budget. The creator queues the grid (grid mode)
    before it publishes the spec, and a joining worker waits up to ``wait_s`` for the spec, so no
    worker can run a trial of a half-created study.
    """
    import optuna

    if n_trials < 1:
        raise TorsionError(f"a search needs at least 1 trial, got {n_trials}; pass --trials 1 or more")
    multi = len(directions) > 1
    if multi and sampler == "grid":
        raise TorsionError("a multi-objective search samples several parameters, so it has no grid; "
                           "choose --sampler tpe or nsga2")
    if sampler == "nsga2" and not multi:
        raise TorsionError("nsga2 is a multi-objective sampler; use it with --multi, or choose tpe or grid")
    if low is not None or high is not None:
        if not (low is not None and high is not None and low < high):
            raise TorsionError(f"the search range needs low < high, got [{low}, {high}]; fix --alpha-range")
        spec = {**spec, "param": param, "low": low, "high": high}
    full_spec = {**spec, "sampler": sampler, **({"directions": list(directions)} if multi else {}),
                 **({"grid_points": n_trials} if sampler == "grid" else {})}
    storage = _storage(url, heartbeat_interval, grace_period)
    prune = prune and not multi
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if prune else optuna.pruners.NopPruner()
    common = dict(storage=storage, study_name=name, directions=list(directions), pruner=pruner)
    with quiet_optuna():
        try:
            study = optuna.create_study(**common, sampler=_sampler(sampler, seed, n_trials, multi),
                                        load_if_exists=False)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.create_study(**common, sampler=_sampler(sampler, worker_seed(seed), n_trials, multi),
                                        load_if_exists=True)
            _check_spec(study, full_spec, wait_s)
            if n_trials > budget(study):
                study.set_user_attr(BUDGET_KEY, n_trials)
            return study
        if sampler == "grid":
            for value in grid_points(low, high, n_trials):
                study.enqueue_trial({param: value})
        study.set_user_attr(BUDGET_KEY, n_trials)
        study.set_user_attr(SPEC_KEY, full_spec)
    return study


def budget(study) -> int:
    """The study's trial budget (a study made before the budget left the spec keeps it there)."""
    attrs = study.user_attrs
    return int(attrs.get(BUDGET_KEY, attrs.get(SPEC_KEY, {}).get("n_trials", 0)))


def _check_spec(study, spec: dict[str, Any], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while (stored := study.user_attrs.get(SPEC_KEY)) is None:
        if time.monotonic() > deadline:
            raise TorsionError(f"study {study.study_name!r} exists but has no objective spec after {wait_s:.0f} s "
                               "(its creator died while creating it); use a new --study name, or delete it with "
                               f"`optuna delete-study --storage URL --study-name {study.study_name}`")
        time.sleep(0.5)
    before, now = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(spec)))
    if before.get("sampler") == "grid" and "grid_points" not in before and "n_trials" in before:
        before["grid_points"] = before["n_trials"]  # a grid made before the budget left the spec
    for key in NOT_OBJECTIVE:  # a study made before these left the spec
        before.pop(key, None)
    if "method.name" not in before and now.get("method.name") == "flat" and not now.get("settings.method_params") \
            and now.get("settings.manifold") is None:  # a study made before steering methods searched flat
        legacy = ("settings.method", "settings.method_params", "settings.manifold")
        before.update({k: v for k, v in now.items() if k.startswith("method.") or k in legacy})
    if "settings.multi" not in before and now.get("settings.multi") is False:  # a study made before --multi
        before["settings.multi"] = False
    changed = [f"{key} {before.get(key, '(none)')} -> {now.get(key, '(none)')}"
               for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if changed:
        raise TorsionError(f"study {study.study_name!r} was made with a different objective ({'; '.join(changed)}); "
                           "resume with the same settings, or pass a new --study name")


def _flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _trial_states(study) -> dict[str, list]:
    from optuna.trial import TrialState

    groups: dict[str, list] = {"finished": [], "claimed": [], "waiting": []}
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            groups["finished"].append(trial)
        elif trial.state == TrialState.RUNNING:
            groups["claimed"].append(trial)
        elif trial.state == TrialState.WAITING:
            groups["waiting"].append(trial)
    return groups


def _is_surplus(study, number: int, n_trials: int) -> bool:
    """True when ``n_trials`` trials numbered below ``number`` are finished, running or queued."""
    from optuna.trial import TrialState

    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.number < number and t.state in alive for t in study.get_trials(deepcopy=False)) >= n_trials


def _was_queued(study, number: int) -> bool:
    """True for a trial taken from the queue (a grid point or a retry), not sampled."""
    return any(t.number == number and "fixed_params" in t.system_attrs for t in study.get_trials(deepcopy=False))


class _Surplus(Exception):
    pass


def run_worker(study, objective: Callable[[Any], float], *, poll_s: float = 1.0,
               log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run trials of ``study`` until its budget is finished; return :func:`study_summary`.

    Safe to run in several processes at once and to re-run after a kill: see the module
    docstring. ``objective(trial)`` returns the value to minimise, or raises
    ``optuna.TrialPruned``.
    """
    with quiet_optuna():
        return _run_worker(study, objective, poll_s, log)


def _run_worker(study, objective: Callable[[Any], float], poll_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    import optuna
    from optuna.storages import fail_stale_trials

    spec = study.user_attrs[SPEC_KEY]
    queued_only = spec["sampler"] == "grid"  # grid points are queued at creation; none is ever sampled

    def guarded(trial) -> float:
        if (queued_only and not _was_queued(study, trial.number)) or _is_surplus(study, trial.number, n_trials):
            trial.set_user_attr(SURPLUS, True)
            raise _Surplus
        return objective(trial)

    waited_for: list[int] = []
    while True:
        n_trials = budget(study)  # another worker may have raised it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_silent_trials(study)
            fail_stale_trials(study)
        states = _trial_states(study)
        if len(states["finished"]) >= n_trials:
            break
        full = len(states["finished"]) + len(states["claimed"]) >= n_trials
        if not states["waiting"] and (full or queued_only):
            claimed = [t.number for t in states["claimed"]]
            if claimed != waited_for:
                log(f"waiting for trial(s) {claimed}: running elsewhere, or stale after the grace period")
                waited_for = claimed
            time.sleep(poll_s)
            continue
        try:
            study.optimize(guarded, n_trials=1, catch=(_Surplus,), callbacks=[_logger(log, n_trials)])
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
            # Another worker judged this trial stale (its heartbeat stalled) and queued it again:
            # its result is dropped here and the retry counts instead. Anything else is a real error.
            if isinstance(error, ValueError) and not str(error).startswith("Cannot tell a FAIL trial"):
                raise
            log(f"a trial of this worker was failed as stale elsewhere ({error}); continuing")
    return study_summary(study)


def fail_silent_trials(study) -> list[int]:
    """Fail (and queue again, like a stale trial) every RUNNING trial that never sent a heartbeat
    and started more than the storage's grace period ago: its worker died between creating the
    trial and its first heartbeat, which Optuna's own stale check never catches.

    Start times are the creating worker's clock, so workers' clocks must agree within the grace
    period (60 s by default). Returns the failed trial numbers.
    """
    import sqlalchemy
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    database = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    grace = getattr(database, "grace_period", None)
    if grace is None or not hasattr(database, "engine"):
        return []
    running = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    query = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True))  # Optuna's schema: trial_heartbeats(trial_id, heartbeat)
    with database.engine.connect() as connection:
        beating = {row[0] for row in connection.execute(query, {"ids": list(running)})}
    cutoff = datetime.now() - timedelta(seconds=grace)
    silent = [t for trial_id, t in running.items()
              if trial_id not in beating and t.datetime_start is not None and t.datetime_start < cutoff]
    callback = storage.get_heartbeat_stale_trial_callback()
    failed = []
    for trial in silent:
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker failed or finished it first
            continue
        failed.append(trial.number)
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return failed


def _logger(log: Callable[[str], None], n_trials: int):
    def callback(study, trial) -> None:
        if not trial.user_attrs.get(SURPLUS):
            value = "" if trial.values is None else f" value {', '.join(f'{v:.4f}' for v in trial.values)}"
            log(f"trial {trial.number} {trial.state.name.lower()}{value} {trial.params} "
                f"({len(_trial_states(study)['finished'])}/{n_trials} finished)")
    return callback


def study_summary(study) -> dict[str, Any]:
    """Every trial's number, state, value(s), params and user attributes; the best complete trial
    (single objective) or the Pareto front's trial numbers, ascending (several objectives)."""
    from optuna.trial import TrialState

    multi = len(study.directions) > 1
    trials = [{"number": t.number, "state": t.state.name, "value": None if multi else t.value, "values": t.values,
               "params": t.params, "user_attrs": t.user_attrs} for t in study.get_trials(deepcopy=False)
              if t.state != TrialState.FAIL or not t.user_attrs.get(SURPLUS)]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = min(complete, key=lambda t: (t["value"], t["number"])) if complete and not multi else None
    front = sorted(t.number for t in study.best_trials) if multi else None
    return {"study": study.study_name, "spec": study.user_attrs.get(SPEC_KEY), "trials": trials, "best": best,
            "front": front, "n_finished": sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials)}


def best_params(summary: dict[str, Any]) -> dict[str, Any]:
    """The best complete trial's params, or an error naming the fix when none completed."""
    if summary["best"] is None:
        raise TorsionError(f"study {summary['study']!r} has no complete trial (all pruned or failed); "
                           "start a new --study with more --trials, or with --no-prune")
    return summary["best"]["params"]
