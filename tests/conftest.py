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
def qwen():
    if not _cached("qwen2.5-coder-0.5b"):
        pytest.skip("embedded:qwen2.5-coder-0.5b is not cached; run `torsion assets pull`")
    from torsion.models import load_model

    return load_model("embedded:qwen2.5-coder-0.5b")
