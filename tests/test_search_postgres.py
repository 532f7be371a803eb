"""Two search workers against one study on a real PostgreSQL server (loopback, started here).

Skipped, with the reason printed, only where PostgreSQL is not installed; ``make test``
installs it from Debian's packages.
"""

import json
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from postgres import postgres_bindir, postgres_server

BINDIR = postgres_bindir()
pytestmark = pytest.mark.skipif(BINDIR is None, reason="PostgreSQL is not installed (initdb/pg_ctl not found); "
                                "`make test` installs Debian's postgresql, or set TORSION_PG_BINDIR")


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server(BINDIR) as url:
        yield url


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from torsion.search import open_study, run_worker

    url, name, sampler, n, barrier, kill_marker = sys.argv[1:7]
    barrier, kill_marker = Path(barrier), Path(kill_marker)

    def objective(trial):
        alpha = trial.suggest_float("alpha", -4.0, 4.0)
        trial.set_user_attr("worker", os.getpid())
        if kill_marker.name != "none" and trial.number == 2 and not kill_marker.exists():
            kill_marker.write_text(str(os.getpid()))   # the test kills this worker here, mid-trial
            time.sleep(600)
        time.sleep(0.3)
        return (alpha - 1.0) ** 2

    study = open_study(url, name, {"objective": "toy"}, n_trials=int(n), low=-4, high=4, sampler=sampler, seed=7,
                       heartbeat_interval=1, grace_period=3)
    (barrier / str(os.getpid())).touch()         # start together: both workers must take part
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.05)
    summary = run_worker(study, objective, poll_s=0.2)
    print(json.dumps({"pid": os.getpid(), "best": summary["best"]["number"], "value": summary["best"]["value"],
                      "n_finished": summary["n_finished"]}))
""")


def _start(tmp_path, url, name, sampler, n, kill_marker="none"):
    script, barrier = tmp_path / "worker.py", tmp_path / f"barrier-{name}"
    script.write_text(WORKER)
    barrier.mkdir()
    return [subprocess.Popen([sys.executable, str(script), url, name, sampler, str(n), str(barrier),
                              str(kill_marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]


def _reports(workers):
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def _two_workers(tmp_path, url, name, sampler, n):
    reports = _reports(_start(tmp_path, url, name, sampler, n))
    return reports, optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_two_workers_share_one_study(tmp_path, postgres_url, sampler):
    n = 10
    reports, trials = _two_workers(tmp_path, postgres_url, f"toy-{sampler}", sampler, n)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert len(complete) == n  # nothing lost
    assert len(trials) == n + len(surplus) and all(t.state.name == "FAIL" for t in surplus)
    workers = {t.user_attrs["worker"] for t in complete}
    assert workers == {r["pid"] for r in reports}  # both workers ran trials
    best = min(complete, key=lambda t: (t.value, t.number))
    assert all(r["best"] == best.number and r["value"] == best.value for r in reports)  # one consistent best
    assert all(r["n_finished"] == n for r in reports)
    alphas = sorted(round(t.params["alpha"], 9) for t in complete)
    assert len(set(alphas)) == n  # no alpha run twice (each worker samples with its own seed)
    if sampler == "grid":  # every grid point exactly once
        assert alphas == [round(-4 + 8 * i / 9, 9) for i in range(n)]


def test_a_killed_worker_s_grid_point_is_run_once_by_the_other(tmp_path, postgres_url):
    marker = tmp_path / "killed"
    workers = _start(tmp_path, postgres_url, "toy-kill", "grid", 8, kill_marker=marker)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "no worker reached trial 2"
        time.sleep(0.05)
    victim = next(w for w in workers if w.pid == int(marker.read_text()))
    victim.send_signal(signal.SIGKILL)
    survivor = next(w for w in workers if w is not victim)
    report = _reports([survivor])[0]
    victim.communicate()
    trials = optuna.load_study(study_name="toy-kill", storage=postgres_url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(round(t.params["alpha"], 9) for t in complete) == [round(-4 + 8 * i / 7, 9) for i in range(8)]
    killed = next(t for t in trials if t.number == 2)
    assert killed.state == optuna.trial.TrialState.FAIL
    assert [t.user_attrs["worker"] for t in complete if t.system_attrs.get("failed_trial") == 2] == [survivor.pid]
    assert report["n_finished"] == 8


def test_two_torsion_optimize_workers_on_a_tiny_run(tmp_path, postgres_url, tiny_run, tiny_model_dir):
    """The real command: two `torsion optimize` processes share one grid study on PostgreSQL."""
    common = [sys.executable, "-m", "torsion.cli", "optimize", str(tiny_run), "--model", str(tiny_model_dir),
              "--storage", postgres_url, "--study", "tiny-grid", "--sampler", "grid", "--trials", "6",
              "--n-prompts", "6", "--n-kl-prompts", "3", "--layer-window", "0", "1", "--top-k", "2",
              "--no-prune", "--batch-size", "3", "--judge", "rules"]  # the tiny run was labelled by a test oracle
    workers = [subprocess.Popen(common + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for extra in ([], ["--no-evaluate"])]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    trials = optuna.load_study(study_name="tiny-grid", storage=postgres_url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(round(t.params["alpha"], 6) for t in complete) == [round(-4 + 0.8 * i, 6) for i in range(6)]
    best = min(complete, key=lambda t: (t.value, t.number))
    result = __import__("json").loads((tiny_run / "analysis" / "optimize_tiny-grid.json").read_text())
    assert result["alpha"] == best.params["alpha"] and result["storage"] == postgres_url
    assert len(result["trials"]) == 6 and "held_out" in result


MULTI_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from torsion.search import open_study, run_worker

    url, name, sampler, n, barrier = sys.argv[1:6]
    barrier = Path(barrier)

    def objective(trial):
        x = trial.suggest_float("x", -2.0, 2.0)
        y = trial.suggest_categorical("y", ["a", "b"])
        trial.set_user_attr("worker", os.getpid())
        time.sleep(0.3)
        return (x - 1.0) ** 2 + (y == "b"), (x + 1.0) ** 2

    study = open_study(url, name, {"objective": "toy-multi"}, n_trials=int(n), sampler=sampler, seed=7,
                       directions=("minimize", "minimize"), heartbeat_interval=1, grace_period=3)
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.05)
    summary = run_worker(study, objective, poll_s=0.2)
    print(json.dumps({"pid": os.getpid(), "front": summary["front"], "n_finished": summary["n_finished"]}))
""")


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_two_workers_share_one_multi_objective_study(tmp_path, postgres_url, sampler):
    n, name = 10, f"toy-multi-{sampler}"
    script, barrier = tmp_path / "multi_worker.py", tmp_path / f"barrier-{name}"
    script.write_text(MULTI_WORKER)
    barrier.mkdir()
    workers = [subprocess.Popen([sys.executable, str(script), postgres_url, name, sampler, str(n), str(barrier)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = _reports(workers)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n
    if sampler == "tpe":  # no point drawn twice (each worker samples with its own seed); NSGA-II's crossover may
        assert len({(t.params["x"], t.params["y"]) for t in complete}) == n  # copy a parent, so not there
    assert {t.user_attrs["worker"] for t in complete} == {r["pid"] for r in reports}  # both took part
    # one front, the non-dominated complete trials, seen alike by both workers
    values = {t.number: t.values for t in complete}
    front = sorted(k for k, v in values.items()
                   if not any(w[0] <= v[0] and w[1] <= v[1] and w != v for w in values.values()))
    assert all(r["front"] == front and r["n_finished"] == n for r in reports)
    assert study.user_attrs["torsion_spec"]["directions"] == ["minimize", "minimize"]


def test_two_torsion_optimize_multi_workers_on_a_tiny_run(tmp_path, postgres_url, tiny_run, tiny_model_dir):
    """The real command: two `torsion optimize --multi` processes share one front study on PostgreSQL."""
    common = [sys.executable, "-m", "torsion.cli", "optimize", str(tiny_run), "--model", str(tiny_model_dir),
              "--method", "weighted-ablation", "--multi", "--storage", postgres_url, "--study", "tiny-multi",
              "--trials", "6", "--n-prompts", "6", "--n-kl-prompts", "3", "--batch-size", "6", "--n-mcq", "0",
              "--judge", "rules"]
    workers = [subprocess.Popen(common + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for extra in ([], ["--no-evaluate"])]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    study = optuna.load_study(study_name="tiny-multi", storage=postgres_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and len({json.dumps(t.params, sort_keys=True) for t in complete}) == 6
    front = json.loads((tiny_run / "analysis" / "front_tiny-multi.json").read_text())
    assert sorted(p["trial"] for p in front["points"]) == sorted(t.number for t in study.best_trials)
    assert front["storage"] == postgres_url and all("heldout" in p for p in front["points"])
