"""Multi-objective refusal removal on tiny models: the front's arithmetic, the search and its file,
resume, the weighted kernel baked into the weights, the exported model card, and bad input."""

import hashlib
import json
from dataclasses import replace

import optuna
import pytest
import torch

import torsion.behaviour as behaviour
import torsion.optimize_multi as optimize_multi
from steering_helpers import PROMPTS
from tiny import tiny_lm
from torsion.capture import encode
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES, Verdict
from torsion.models import load_model
from torsion.optimize import SearchSettings
from torsion.optimize_multi import REFERENCE_POINT, kernel_space, method_params, run_optimize_multi
from torsion.orthogonalize import orthogonalize_method, orthogonalize_weights
from torsion.pareto import check_pick, front_indices, hypervolume_2d, knee_index, pick_index
from torsion.steer import ablate_direction
from torsion.steering import get_method


class ResponseHashJudge:
    """Refuses by a hash of the response, so a change of steering changes the refusal rate."""

    name = "response-hash"

    def judge(self, prompts, responses):
        labels = ["strong_refuse" if hashlib.sha256(r.encode()).digest()[0] % 2 else "strong_comply"
                  for r in responses]
        return [Verdict(label, LABEL_SCORES[label], self.name) for label in labels]


JUDGE = ResponseHashJudge()


# ----- the front's arithmetic, by hand -----

def test_hypervolume_by_hand():
    # (0.1, 0.5) and (0.4, 0.2) under (1, 1): 0.9*0.5 + 0.6*0.3 = 0.63; a dominated point adds nothing
    assert hypervolume_2d([(0.1, 0.5), (0.4, 0.2)], (1.0, 1.0)) == pytest.approx(0.63)
    assert hypervolume_2d([(0.4, 0.2), (0.1, 0.5), (0.5, 0.6)], (1.0, 1.0)) == pytest.approx(0.63)
    # three steps: 1*(2-1.5) [x=0] + 0.5*(1.5-0.5) [x=0.5] + 0.2*(0.5-0) [x=0.8] = 0.5 + 0.5 + 0.1 = 1.1
    assert hypervolume_2d([(0.8, 0.0), (0.0, 1.5), (0.5, 0.5)], (1.0, 2.0)) == pytest.approx(1.1)
    # points on or past the reference add nothing; duplicates count once
    assert hypervolume_2d([(1.0, 0.1), (0.2, 3.0)], (1.0, 2.0)) == 0.0
    assert hypervolume_2d([(0.5, 0.5), (0.5, 0.5)], (1.0, 1.0)) == pytest.approx(0.25)
    assert hypervolume_2d([], (1.0, 1.0)) == 0.0


def test_hypervolume_agrees_with_a_grid_count():
    rng = torch.Generator().manual_seed(0)
    points = [tuple(map(float, p)) for p in torch.rand(12, 2, generator=rng)]
    n = 400  # fraction of grid cell centres dominated by some point
    centres = (torch.arange(n) + 0.5) / n
    x, y = torch.meshgrid(centres, centres, indexing="ij")
    covered = torch.zeros(n, n, dtype=torch.bool)
    for px, py in points:
        covered |= (x >= px) & (y >= py)
    assert hypervolume_2d(points, (1.0, 1.0)) == pytest.approx(covered.float().mean().item(), abs=5e-3)


def test_front_knee_and_pick_rules():
    points = [(0.0, 0.9), (0.05, 0.4), (0.3, 0.1), (0.6, 0.0), (0.3, 0.5)]
    assert front_indices(points) == [0, 1, 2, 3]
    # normalised over the points: x/0.6, y/0.9 -> distances to (0,0): 1, .45, .51, 1, .74 -> point 1
    assert knee_index(points) == 1
    assert pick_index(points, "refusal<=0.05") == 1  # lowest KL among refusal <= 0.05
    assert pick_index(points, "refusal <= 0.3") == 2
    assert pick_index(points, "refusal<=1") == 3
    assert pick_index(points, "knee") == 1 and pick_index(points, "4") == 4
    with pytest.raises(TorsionError, match=r"no front point has held-out refusal rate <= 0.01 \(the lowest is 0.100"):
        pick_index([(0.2, 0.1), (0.1, 0.2)], "refusal<=0.01")
    with pytest.raises(TorsionError, match="the front has 5 points"):
        pick_index(points, "5")
    for bad in ("refusal<0.1", "refusal<=1.5", "kl<=0.1", "-1", ""):
        with pytest.raises(TorsionError, match="is not a rule"):
            check_pick(bad)


# ----- the weighted kernel baked into the weights equals its hooks -----

@pytest.fixture(scope="module")
def lm4():
    return tiny_lm("llama", n_layers=4)


@pytest.mark.parametrize("components", ["attn+mlp", "attn", "mlp"])
@pytest.mark.parametrize("direction_index", [None, 1.4])
def test_orthogonalised_weights_equal_the_hooks(lm4, components, direction_index):
    v = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    method = get_method("weighted-ablation", directions=v, peak_weight=1.3, peak_position=1.6, width=2.5,
                        floor=0.4, direction_index=direction_index, components=components)
    assert len(set(method.block_weights(lm4, 1.0))) == 4  # a kernel that differs at every block
    inputs = encode(lm4, PROMPTS)
    with torch.inference_mode():
        base = lm4.model(**inputs).logits
        with method.apply(lm4, 1.0):
            hooked = lm4.model(**inputs).logits
        baked = orthogonalize_method(lm4, method, 1.0).model(**inputs).logits
        unchanged = lm4.model(**inputs).logits
    assert (hooked - base).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(baked, hooked, atol=1e-4, rtol=0)
    assert torch.equal(unchanged, base)  # a deep copy was edited


def test_partial_weights_edit_the_matrix_by_the_formula(lm4):
    v = torch.randn(32, generator=torch.Generator().manual_seed(4))
    unit = (v / v.norm()).double()
    weights = [0.0, 0.5, 1.0, 1.5]
    edited = orthogonalize_weights(lm4, v, weight=weights, writes=("attn",))
    for layer, w in enumerate(weights):
        before = lm4.layout.attn[layer].o_proj.weight.double()
        expected = before - w * torch.outer(unit, unit @ before)
        torch.testing.assert_close(edited.layout.attn[layer].o_proj.weight.double(), expected, atol=1e-6, rtol=0)
        assert torch.equal(edited.layout.mlp[layer].down_proj.weight, lm4.layout.mlp[layer].down_proj.weight)
    assert torch.equal(edited.layout.embed.weight, lm4.layout.embed.weight)
    with torch.inference_mode(), ablate_direction(lm4, v, weight=weights, writes=("attn",)):
        hooked = lm4.model(**encode(lm4, PROMPTS)).logits
    torch.testing.assert_close(edited.model(**encode(lm4, PROMPTS)).logits, hooked, atol=1e-4, rtol=0)


def test_kernel_space_follows_heretic_ranges():
    space = kernel_space(25)  # last block 24
    assert space["peak_position"] == [pytest.approx(14.4), 24.0] and space["width"] == [1.0, pytest.approx(14.4)]
    assert space["direction_index"] == [pytest.approx(9.6), pytest.approx(21.6)]
    assert space["peak_weight"] == [0.8, 1.5] and space["components"] == ["attn+mlp", "attn", "mlp"]
    assert space["direction_source"] == ["refusal", "harm"]
    sampled = {"peak_weight": 1.2, "peak_position": 20.0, "floor_fraction": 0.5, "width": 3.0,
               "direction_index": 12.5, "direction_scope": "per-block", "components": "attn",
               "direction_source": "harm"}
    assert method_params(sampled) == {"peak_weight": 1.2, "peak_position": 20.0, "width": 3.0, "floor": 0.6,
                                      "direction_index": None, "components": "attn"}


# ----- the search on a tiny run -----

@pytest.fixture(scope="module")
def tiny_lm_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _settings(**overrides):
    return SearchSettings(**{"objective": "comply", "method": "weighted-ablation", "multi": True, "n_trials": 5,
                             "n_prompts": 6, "n_kl_prompts": 3, "n_mcq": 0, "batch_size": 6, "seed": 0,
                             **overrides})


def test_harm_directions_are_computed_once_from_train_rows_and_the_probe_half(tiny_run, tiny_lm_loaded,
                                                                             monkeypatch):
    from torsion.capture import capture_batch, load_activations
    from torsion.data import read_prompts_jsonl
    from torsion.runs import neutral_halves
    from torsion.store import RunDir
    from torsion.vectors import harm_direction

    run = RunDir(tiny_run)
    harmless = neutral_halves(run)[0]
    vector = optimize_multi.harm_vector(run, tiny_lm_loaded, "harm-test", harmless)
    prompts = read_prompts_jsonl(run.prompts_path)
    rows = [i for i, p in enumerate(prompts) if p.split == "train"]
    assert 0 < len(rows) < len(prompts) and vector.meta["n_harmful"] == len(rows)
    harmful = load_activations(run.activations_path)[0]["resid"][rows]
    neutral = torch.cat([capture_batch(tiny_lm_loaded, [p.prompt], components=("resid",))["resid"]["last"]
                         for p in harmless])
    torch.testing.assert_close(vector.directions, harm_direction(harmful, neutral), atol=1e-5, rtol=0)
    assert (tiny_run / "analysis" / "harm_harm-test.safetensors").is_file()

    # a resumed search reads the file; other harmless prompts make it compute again
    captured = []
    original = optimize_multi.capture_batch
    monkeypatch.setattr(optimize_multi, "capture_batch", lambda *a, **k: captured.append(1) or original(*a, **k))
    assert torch.equal(optimize_multi.harm_vector(run, tiny_lm_loaded, "harm-test", harmless).directions,
                       vector.directions) and captured == []
    other = optimize_multi.harm_vector(run, tiny_lm_loaded, "harm-test", harmless[:2])
    assert captured and other.meta["n_harmless"] == 2 and not torch.equal(other.directions, vector.directions)


def test_multi_search_front_file_and_resume(tiny_run, tiny_lm_loaded, monkeypatch):
    front = run_optimize_multi(tiny_run, tiny_lm_loaded, _settings(), judge=JUDGE, log=lambda m: None)
    assert front["study"] == "multi-weighted-ablation-comply" and front["n_trials"] == 5
    assert front["objectives"] == ["refusal_rate", "kl_base_to_steered"] and front["sampler"] == "tpe"
    study = optuna.load_study(study_name=front["study"], storage=f"sqlite:///{tiny_run / 'optimize.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    values = [tuple(t.values) for t in complete]
    assert sorted(p["trial"] for p in front["points"]) == sorted(complete[i].number for i in front_indices(values))
    for point in front["points"]:
        trial = next(t for t in complete if t.number == point["trial"])
        evaluation = trial.user_attrs["evaluation"]
        refused = sum(label == "strong_refuse" for label in evaluation["labels"])
        assert point["train"]["refusal_rate"] == pytest.approx(refused / 6)  # recomputed from the stored labels
        assert point["train"]["kl"] == evaluation["kl_base_to_steered"]
        held = point["heldout"]
        assert held["n"] == 8 and 0 <= held["refusal_ci"][0] <= held["refusal_rate"] <= held["refusal_ci"][1]
        assert held["kl_base_to_steered"] >= 0 and held["kl_steered_to_base"] >= 0 and held["perplexity_ratio"] > 0
        assert set(point["params"]) == set(kernel_space(4))
    assert front["hypervolume_train"] == pytest.approx(hypervolume_2d(
        [(p["train"]["refusal_rate"], p["train"]["kl"]) for p in front["points"]], REFERENCE_POINT))
    assert front["hypervolume_heldout"] == pytest.approx(hypervolume_2d(
        [(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"]) for p in front["points"]],
        REFERENCE_POINT))
    saved = json.loads((tiny_run / "analysis" / f"front_{front['study']}.json").read_text())
    assert saved["points"] == json.loads(json.dumps(front["points"])) and saved["reference_point"] == [1.0, 1.0]

    # a rerun replays nothing: no trial is generated again and no point is evaluated again
    seen = []
    original = behaviour.iter_generate
    monkeypatch.setattr(behaviour, "iter_generate", lambda lm, batch, s: seen.extend(batch) or original(lm, batch, s))
    again = run_optimize_multi(tiny_run, tiny_lm_loaded, _settings(), judge=JUDGE, log=lambda m: None)
    assert seen == [] and again["points"] == front["points"]
    # a raised budget runs only the extra trial
    more = run_optimize_multi(tiny_run, tiny_lm_loaded, _settings(n_trials=6), judge=JUDGE, evaluate=False,
                              log=lambda m: None)
    assert more["n_trials"] == 6 and len(seen) == 6
    with pytest.raises(TorsionError, match="different objective"):
        run_optimize_multi(tiny_run, tiny_lm_loaded, _settings(n_prompts=5), judge=JUDGE, log=lambda m: None)


def test_a_killed_front_evaluation_resumes_after_the_last_point(tiny_run, tiny_lm_loaded, monkeypatch):
    calls = []
    original = optimize_multi.evaluate_point

    def dies_on_the_second(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    # the first seed whose front has two points or more (trials only, then the killed evaluation)
    for seed in range(1, 13):
        settings = _settings(n_trials=6, seed=seed)
        name = f"multi-seed-{seed}"
        trials_only = run_optimize_multi(tiny_run, tiny_lm_loaded, settings, study_name=name, evaluate=False,
                                         judge=JUDGE, log=lambda m: None)
        if len(trials_only["points"]) >= 2:
            break
    assert len(trials_only["points"]) >= 2, "no seed in 1..12 gave a front of two points"
    monkeypatch.setattr(optimize_multi, "evaluate_point", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_optimize_multi(tiny_run, tiny_lm_loaded, settings, study_name=name, judge=JUDGE, log=lambda m: None)
    saved = json.loads((tiny_run / "analysis" / f"front_{name}.json").read_text())
    n_points = len(saved["points"])
    assert [bool(p.get("heldout")) for p in saved["points"]] == [True] + [False] * (n_points - 1)
    monkeypatch.setattr(optimize_multi, "evaluate_point", lambda *a, **k: calls.append(2) or original(*a, **k))
    front = run_optimize_multi(tiny_run, tiny_lm_loaded, settings, study_name=name, judge=JUDGE, log=lambda m: None)
    assert calls.count(2) == n_points - 1 and front["points"][0]["heldout"] == saved["points"][0]["heldout"]


def test_nsga2_runs_and_multi_settings_refuse_what_they_cannot_do():
    assert _settings(sampler="nsga2").sampler == "nsga2"
    with pytest.raises(TorsionError, match="has none; use --method weighted-ablation"):
        _settings(method="flat")
    with pytest.raises(TorsionError, match="has none"):
        _settings(method="ablation")
    with pytest.raises(TorsionError, match="--objective comply"):
        _settings(objective="refuse")
    with pytest.raises(TorsionError, match="tpe or nsga2"):
        _settings(sampler="grid")
    with pytest.raises(TorsionError, match="add --multi"):
        SearchSettings(sampler="nsga2")
    with pytest.raises(TorsionError, match="drop --param"):
        _settings(method_params={"width": 2.0})


def test_cli_multi_then_orthogonalize_from_the_study(tiny_run, tiny_model_dir, tmp_path, capsys):
    common = ["optimize", str(tiny_run), "--model", str(tiny_model_dir), "--method", "weighted-ablation", "--multi",
              "--trials", "4", "--n-prompts", "6", "--n-kl-prompts", "3", "--batch-size", "6", "--judge", "rules", "--n-mcq", "0"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "front_multi-weighted-ablation-comply.json" in out and "hypervolume train" in out
    assert "Refusal removal front" in (tiny_run / "report.html").read_text()
    study = tiny_run / "multi-weighted-ablation-comply"
    target = tmp_path / "baked"
    assert main(["orthogonalize", "--from-study", str(study), "--pick", "knee", "--out", str(target)]) == 0
    card = (target / "README.md").read_text()
    front = json.loads((tiny_run / "analysis" / "front_multi-weighted-ablation-comply.json").read_text())
    knee = knee_index([(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"]) for p in front["points"]])
    point = front["points"][knee]
    assert f"front point {knee}" in card and front["prompts"]["holdout_ids_sha256"] in card
    assert f"{point['heldout']['kl_base_to_steered']:.4f}" in card
    lm = load_model(str(tiny_model_dir))
    from torsion.vectors import load_vectors

    directions = {"refusal": load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions,
                  "harm": load_vectors(tiny_run / front["direction_sources"]["harm"]["file"])["harm/resid"].directions}
    assert front["direction_sources"]["harm"]["sha256"] == hashlib.sha256(directions["harm"].numpy().tobytes()).hexdigest()

    def assert_baked_equals_hooks(target, point):
        source = point["params"]["direction_source"]
        method = get_method("weighted-ablation", directions=directions[source], **point["method_params"])
        inputs = encode(lm, PROMPTS)
        with torch.inference_mode():
            with method.apply(lm, 1.0):
                hooked = lm.model(**inputs).logits
            torch.testing.assert_close(load_model(str(target)).model(**inputs).logits, hooked, atol=1e-4, rtol=0)

    assert_baked_equals_hooks(target, point)
    # each direction source bakes its own directions (the card says which)
    front_path = tiny_run / "analysis" / "front_multi-weighted-ablation-comply.json"
    saved = front_path.read_text()
    for source, phrase in (("harm", "the harm direction"), ("refusal", "the run's `md/resid` vector")):
        edited = json.loads(saved)
        edited["points"][0]["params"]["direction_source"] = source
        front_path.write_text(json.dumps(edited))
        assert main(["orthogonalize", "--from-study", str(study), "--pick", "0", "--out", str(tmp_path / source)]) == 0
        assert_baked_equals_hooks(tmp_path / source, edited["points"][0])
        assert phrase in (tmp_path / source / "README.md").read_text()
    harm_file = tiny_run / front["direction_sources"]["harm"]["file"]
    harm_bytes = harm_file.read_bytes()
    from torsion.vector_file import SteeringVector, save_vectors

    save_vectors(harm_file, {"harm/resid": SteeringVector(directions["harm"].flip(0))}, run_meta={})
    edited["points"][0]["params"]["direction_source"] = "harm"
    front_path.write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["orthogonalize", "--from-study", str(study), "--pick", "0", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("torsion: error: ") and "changed since the study ran" in err.splitlines()[-1]
    harm_file.unlink()
    assert main(["orthogonalize", "--from-study", str(study), "--pick", "0", "--out", str(tmp_path / "y")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("torsion: error: ") and "is missing; rerun `torsion optimize" in last
    harm_file.write_bytes(harm_bytes)
    front_path.write_text(saved)

    # bad input: one line, exit 2
    capsys.readouterr()
    for argv, message in [
        (["optimize", str(tiny_run), "--model", str(tiny_model_dir), "--method", "flat", "--multi"], "has none"),
        (["orthogonalize", "--from-study", str(study), "--pick", "99", "--out", str(tmp_path / "x")],
         "the front has"),
        (["orthogonalize", "--from-study", str(tiny_run / "nope"), "--pick", "knee", "--out", str(tmp_path / "x")],
         "is missing"),
        (["orthogonalize", "--from-study", str(study), "--pick", "kl<=1", "--out", str(tmp_path / "x")],
         "is not a rule"),
        (["orthogonalize", "--from-study", str(study), "--out", str(tmp_path / "x")], "go together"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    for p in front["points"]:
        p["heldout"]["refusal_rate"] = 0.5
    front_path.write_text(json.dumps(front))
    code = main(["orthogonalize", "--from-study", str(study), "--pick", "refusal<=0.1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "no front point has held-out refusal rate <= 0.1" in err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()
