import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py
# Tiny models are dominated by thread overhead; one thread is also steadier on a shared machine.
torch.set_num_threads(1)


def _cached(name: str) -> bool:
    from torsion import assets

    return assets.is_cached(name)


@pytest.fixture(scope="session")
def smollm():
    if not _cached("smollm2-135m"):
        pytest.skip("embedded:smollm2-135m is not cached; run `torsion assets pull`")
    from torsion.models import load_model

    return load_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny_run import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    from tiny_run import write_prompt_file

    return write_prompt_file(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tiny_model_dir, prompt_file):
    """A finished `torsion run` directory on the tiny model (oracle labels). Copy it before writing."""
    from tiny_run import OracleJudge, run_config
    from torsion.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    run_pipeline(run_config(tiny_model_dir, prompt_file), out, judge=OracleJudge(), log=lambda m: None)
    return out


@pytest.fixture
def tiny_run(tmp_path, finished_tiny_run):
    """A private copy of :func:`finished_tiny_run` that a test may write into."""
    import shutil

    return Path(shutil.copytree(finished_tiny_run, tmp_path / "run"))
