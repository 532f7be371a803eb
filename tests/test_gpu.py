"""Reduced-precision placement: a tiny model loaded as a Hugging Face directory in bfloat16, on CUDA
with ``device="auto"`` (a device map; marked ``gpu``, skipped without CUDA) and on the CPU (always
run, so the dtype handling is tested everywhere), against the same weights in float32 on the CPU.

Tolerance, stated once: for capture, steering and ablation, every compared tensor's relative
error ``‖x_bf16 − x_fp32‖ / ‖x_fp32‖`` (logits at real, unpadded positions) stays below
``BF16_TOLERANCE`` = 3%. bfloat16 keeps 8 bits of mantissa, a relative step of 2⁻⁸ ≈ 0.4% per
rounding, and 4 blocks compound a few of them: on the CPU the errors measured 0.4–0.7% for
logits and up to 1.1% for captured activations. Each steering and ablation check also shows the
intervention moves the float32 logits by at least five times the tolerance, so the agreement is
not the trivial one of two nearly unchanged models.
"""

from __future__ import annotations

import pytest
import torch

from torsion.capture import capture_batch, encode
from torsion.models import load_model
from torsion.steer import ablate_direction, add_steering

BF16_TOLERANCE = 0.03
PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and the knight please"]

PLACEMENTS = [
    pytest.param("cpu", id="cpu-bfloat16"),
    pytest.param("auto", id="cuda-auto-bfloat16", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible here")]),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module", params=PLACEMENTS)
def placed(request, tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="bfloat16", device=request.param)
    assert lm.model.dtype == torch.bfloat16
    assert lm.device.type == ("cuda" if request.param == "auto" else "cpu")
    return lm


def _vectors(lm):
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(lm, steer=None):
    """Logits at the real (unpadded) positions, ``[n_real_tokens, vocab]`` float32 on the CPU."""
    inputs = encode(lm, PROMPTS)
    real = inputs["attention_mask"].bool().cpu()
    if steer is None:
        return lm.model(**inputs).logits.float().cpu()[real]
    with steer:
        return lm.model(**inputs).logits.float().cpu()[real]


def test_capture_agrees_with_float32_cpu(placed, reference):
    components = ("resid", "attn", "mlp")
    low = capture_batch(placed, PROMPTS, components=components, positions=("last", "post_instruction"))
    full = capture_batch(reference, PROMPTS, components=components, positions=("last", "post_instruction"))
    for component in components:
        for position in ("last", "post_instruction"):
            assert low[component][position].dtype == torch.float32  # captured values are always float32
            assert low[component][position].shape == full[component][position].shape == (3, 4, 32)
            for layer in range(reference.n_layers):
                error = relative_error(low[component][position][:, layer], full[component][position][:, layer])
                assert error < BF16_TOLERANCE, (component, position, layer, error)


def test_steering_agrees_with_float32_cpu(placed, reference):
    v = _vectors(reference)
    base = _logits(reference)
    for component in ("resid", "attn"):
        steer = {"layers": [1, 2], "alpha": [2.0, -1.5], "component": component, "positions": "all"}
        with add_steering(placed, v, **steer) as low_record:
            low = _logits(placed)
        full = _logits(reference, add_steering(reference, v, **steer))
        assert relative_error(full, base) > 5 * BF16_TOLERANCE  # the steering moves the logits
        assert relative_error(low, full) < BF16_TOLERANCE, component
        assert low_record.applied_norms == pytest.approx([2.0 * float(v[1].double().norm()),
                                                          1.5 * float(v[2].double().norm())], rel=1e-12)


def test_ablation_agrees_with_float32_cpu(placed, reference):
    direction = _vectors(reference)[1]
    base = _logits(reference)
    full = _logits(reference, ablate_direction(reference, direction))
    low = _logits(placed, ablate_direction(placed, direction))
    assert relative_error(full, base) > 5 * BF16_TOLERANCE
    assert relative_error(low, full) < BF16_TOLERANCE
