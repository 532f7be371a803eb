"""Search bookkeeping on SQLite: budget, grid, spec checks, resume after a kill mid-trial."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import optuna
import pytest

from torsion.errors import TorsionError
from torsion.search import best_params, grid_points, open_study, redact_url, run_worker, storage_url

SPEC = {"objective": "toy", "scale": 1.0}


def quadratic(trial):
    alpha = trial.suggest_float("alpha", -4.0, 4.0)
    return (alpha - 1.0) ** 2


def test_budget_is_exact_and_best_is_the_minimum(tmp_path):
    url = storage_url(tmp_path, None)
    summary = run_worker(open_study(url, "s", SPEC, n_trials=7, low=-4, high=4, seed=1), quadratic)
    assert summary["n_finished"] == 7 and len(summary["trials"]) == 7
    values = [t["value"] for t in summary["trials"]]
    assert summary["best"]["value"] == min(values)
    assert summary["best"]["value"] == pytest.approx((summary["best"]["params"]["alpha"] - 1) ** 2)
    # a second worker on a finished study does nothing
    again = run_worker(open_study(url, "s", SPEC, n_trials=7, low=-4, high=4, seed=1), quadratic)
    assert [t["number"] for t in again["trials"]] == [t["number"] for t in summary["trials"]]


def test_grid_mode_runs_each_point_once(tmp_path):
    url = storage_url(tmp_path, None)
    summary = run_worker(open_study(url, "g", SPEC, n_trials=5, low=-2, high=2, sampler="grid"), quadratic)
    assert sorted(t["params"]["alpha"] for t in summary["trials"]) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert best_params(summary) == {"alpha": 1.0}
    assert grid_points(0.0, 1.0, 3) == [0.0, 0.5, 1.0]


def test_a_changed_objective_is_refused(tmp_path):
    url = storage_url(tmp_path, None)
    open_study(url, "s", SPEC, n_trials=3, low=-1, high=1)
    with pytest.raises(TorsionError, match=r"different objective \(scale 1.0 -> 2.0\)"):
        open_study(url, "s", {**SPEC, "scale": 2.0}, n_trials=3, low=-1, high=1)
    with pytest.raises(TorsionError, match=r"different objective \(low -1 -> -2\)"):
        open_study(url, "s", SPEC, n_trials=3, low=-2, high=1)
    open_study(storage_url(tmp_path, None), "g", SPEC, n_trials=3, low=-1, high=1, sampler="grid")
    with pytest.raises(TorsionError, match=r"different objective \(grid_points 3 -> 5\)"):  # a grid is its points
        open_study(url, "g", SPEC, n_trials=5, low=-1, high=1, sampler="grid")


def test_a_resume_may_raise_the_budget_and_runs_only_the_extra_trials(tmp_path):
    url = storage_url(tmp_path, None)
    first = run_worker(open_study(url, "s", SPEC, n_trials=3, low=-4, high=4, seed=1), quadratic)
    assert first["n_finished"] == 3
    ran = []

    def counting(trial):
        ran.append(trial.number)
        return quadratic(trial)

    more = run_worker(open_study(url, "s", SPEC, n_trials=5, low=-4, high=4, seed=2), counting)
    assert ran == [3, 4] and more["n_finished"] == 5
    assert [t["value"] for t in more["trials"][:3]] == [t["value"] for t in first["trials"]]
    # a worker asking for less does not shrink the budget, and finds nothing left to do
    assert run_worker(open_study(url, "s", SPEC, n_trials=2, low=-4, high=4), counting)["n_finished"] == 5
    assert ran == [3, 4]


def test_a_study_made_with_the_budget_in_its_spec_still_resumes(tmp_path):
    from torsion.search import SPEC_KEY

    url = storage_url(tmp_path, None)
    old = optuna.create_study(storage=url, study_name="old", direction="minimize")  # as torsion wrote it before
    old.set_user_attr(SPEC_KEY, {**SPEC, "settings": {"kl_weight": 1.0, "n_trials": 2, "batch_size": 8, "seed": 0},
                                 "param": "alpha", "low": -4, "high": 4, "n_trials": 2, "sampler": "tpe"})
    assert run_worker(open_study(url, "old", {**SPEC, "settings": {"kl_weight": 1.0}}, n_trials=2, low=-4, high=4),
                      quadratic)["n_finished"] == 2
    resumed = open_study(url, "old", {**SPEC, "settings": {"kl_weight": 1.0}}, n_trials=3, low=-4, high=4)
    assert run_worker(resumed, quadratic)["n_finished"] == 3
    with pytest.raises(TorsionError, match=r"settings.kl_weight 1.0 -> 2.0"):
        open_study(url, "old", {**SPEC, "settings": {"kl_weight": 2.0}}, n_trials=3, low=-4, high=4)
    grid = optuna.create_study(storage=url, study_name="old-grid", direction="minimize")
    grid.set_user_attr(SPEC_KEY, {**SPEC, "param": "alpha", "low": -2, "high": 2, "n_trials": 5, "sampler": "grid"})
    for value in grid_points(-2, 2, 5):
        grid.enqueue_trial({"alpha": value})
    summary = run_worker(open_study(url, "old-grid", SPEC, n_trials=5, low=-2, high=2, sampler="grid"), quadratic)
    assert sorted(t["params"]["alpha"] for t in summary["trials"]) == [-2.0, -1.0, 0.0, 1.0, 2.0]


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_retried(tmp_path):
    import threading

    url = storage_url(tmp_path, None)
    study = open_study(url, "silent", SPEC, n_trials=2, low=-4, high=4, seed=0, heartbeat_interval=1, grace_period=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat is supposed to be used with optimize"
        orphan = study.ask()  # RUNNING, no heartbeat ever sent: its worker died right after creating it
    orphan_alpha = orphan.suggest_float("alpha", -4.0, 4.0)
    time.sleep(1.5)  # older than the grace period
    result = {}
    worker = threading.Thread(target=lambda: result.update(run_worker(study, quadratic, poll_s=0.1)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the worker waited forever on a trial nobody runs"
    trials = optuna.load_study(study_name="silent", storage=url).get_trials(deepcopy=False)
    assert next(t for t in trials if t.number == orphan.number).state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].params == {"alpha": orphan_alpha}
    assert retried[0].state == optuna.trial.TrialState.COMPLETE and result["n_finished"] == 2


def test_optuna_logging_is_left_as_the_caller_set_it(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        run_worker(open_study(storage_url(tmp_path, None), "s", SPEC, n_trials=1, low=-4, high=4), quadratic)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(TorsionError, match="low < high"):
        open_study(storage_url(tmp_path, None), "s", SPEC, n_trials=3, low=1, high=1)
    with pytest.raises(TorsionError, match="at least 1 trial"):
        open_study(storage_url(tmp_path, None), "s", SPEC, n_trials=0, low=0, high=1)
    with pytest.raises(TorsionError, match="cannot open the study storage postgresql://u:\\*\\*\\*@"):
        open_study("postgresql://u:secret@127.0.0.1:1/db", "s", SPEC, n_trials=1, low=0, high=1)
    assert redact_url("postgresql://me:pw@host/db") == "postgresql://me:***@host/db"


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torsion.search import open_study, run_worker

    url, marker, sleep_on = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

    def objective(trial):
        alpha = trial.suggest_float("alpha", -4.0, 4.0)
        if trial.number == sleep_on and not marker.exists():
            marker.write_text("running")      # the parent kills us here, mid-trial
            time.sleep(600)
        return (alpha - 1.0) ** 2

    study = open_study(url, "kill", {"objective": "toy"}, n_trials=6, low=-4, high=4, seed=3,
                       heartbeat_interval=1, grace_period=2)
    summary = run_worker(study, objective, poll_s=0.2)
    print(summary["n_finished"])
""")


def test_kill_mid_trial_then_resume(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = storage_url(tmp_path, None)
    marker = tmp_path / "marker"
    worker = subprocess.Popen([sys.executable, str(script), url, str(marker), "3"], start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert worker.poll() is None and time.monotonic() < deadline, "worker ended before reaching trial 3"
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    before = optuna.load_study(study_name="kill", storage=url).get_trials(deepcopy=False)
    finished_before = {t.number: t.value for t in before if t.state.is_finished()}
    assert sorted(finished_before) == [0, 1, 2]
    assert [t.state.name for t in before if t.number == 3] == ["RUNNING"]

    done = subprocess.run([sys.executable, str(script), url, str(marker), "-1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    after = optuna.load_study(study_name="kill", storage=url).get_trials(deepcopy=False)
    complete = [t for t in after if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and done.stdout.split()[-1] == "6"
    assert {t.number: t.value for t in complete if t.number < 3} == finished_before  # not re-run, not re-scored
    killed = next(t for t in after if t.number == 3)
    assert killed.state == optuna.trial.TrialState.FAIL
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == 3]
    assert len(retried) == 1 and retried[0].params == killed.params  # the killed alpha is run again, once


def test_pruned_trials_count_toward_the_budget_and_keep_their_last_value(tmp_path):
    def reporting(trial):
        alpha = trial.suggest_float("alpha", -4.0, 4.0)
        for step in range(3):
            trial.report((alpha - 1.0) ** 2 + step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return (alpha - 1.0) ** 2 + 2

    study = open_study(storage_url(tmp_path, None), "p", SPEC, n_trials=12, low=-4, high=4, seed=0)
    summary = run_worker(study, reporting)
    pruned = [t for t in summary["trials"] if t["state"] == "PRUNED"]
    assert summary["n_finished"] == 12 and pruned  # the median rule stopped some trials early
    for trial in pruned:
        stored = study.trials[trial["number"]]
        assert trial["value"] == stored.intermediate_values[max(stored.intermediate_values)]
    assert summary["best"]["state"] == "COMPLETE"
    grid = open_study(storage_url(tmp_path, None), "g", SPEC, n_trials=5, low=-4, high=4, sampler="grid", prune=False)
    assert all(t["state"] == "COMPLETE" for t in run_worker(grid, reporting)["trials"])
