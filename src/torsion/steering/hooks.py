"""Replacement hooks: ``h' = f_l(h)`` at a component of chosen blocks (ACE, splines).

The additive and ablation methods call :mod:`torsion.steer` directly; this is the one hook
that module lacks, built the same way: prepended forward hooks removed in ``finally``, the
same prefill/generation rule (:class:`torsion.steer._PhaseTracker`), ``positions`` ``last``
(the prompt's last token in prefill, then each new token) or ``all``. Each transform runs in
float32 on the positions it steers (during decoding, the one new token) and returns ``h'`` and
its float32 ``h' − h``, whose norm goes to the record; ``h'`` is cast back to the activation dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torsion.capture import output_tensor
from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steer import POSITIONS, _PhaseTracker
from torsion.steering.base import MethodRecord

Transform = Callable[[Tensor], tuple[Tensor, Tensor]]  # h [..., d_model] float32 -> (h', h' − h), both like h


@contextmanager
def replace_steering(lm: LoadedModel, transforms: Sequence[Transform], record: MethodRecord,
                     *, phase: str = "both") -> Iterator[MethodRecord]:
    """Replace the output of ``record.component`` at each of ``record.layers`` by ``transforms[i](h)``."""
    if record.positions not in POSITIONS:
        raise TorsionError(f"unknown positions {record.positions!r}; choose last or all")
    tracker = _PhaseTracker(phase, None)

    def make_hook(index: int, transform: Transform):
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            if not tracker.active:
                return None
            hidden = output_tensor(output)
            if record.positions == "all" or hidden.shape[1] == 1:
                new, delta = transform(hidden.float())
                record.observe(index, delta)
                new = new.to(hidden.dtype)
            else:  # prefill, positions "last": only the prompt's last token
                new_last, delta = transform(hidden[:, -1].float())
                record.observe(index, delta)
                new = hidden.clone()
                new[:, -1] = new_last.to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles: list[RemovableHandle] = []
    try:
        handles.append(lm.layout.decoder.register_forward_pre_hook(tracker.before_forward, with_kwargs=True))
        for index, (layer, transform) in enumerate(zip(record.layers, transforms)):
            module = lm.layout.component_module(record.component, layer)
            handles.append(module.register_forward_hook(make_hook(index, transform), prepend=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def block_device(lm: LoadedModel, component: str, layer: int) -> torch.device:
    """The device of the module whose output is steered (blocks may sit on several GPUs)."""
    weight = next(lm.layout.component_module(component, layer).parameters(), None)
    return weight.device if weight is not None else lm.device


def subspace_target(basis: Tensor, mean: Tensor, target: Tensor, beta: float, device: Any) -> Transform:
    """``h ↦ h + β Uᵀ(s − U(h − μ))``, and ``h' − h``.

    ``U`` = ``basis`` ``[k, d]`` (orthonormal rows), ``μ`` = ``mean`` ``[d]``, ``s`` = ``target`` ``[k]``.

    Replacement inside the subspace with mixing ``β``; the orthogonal complement is kept. Built
    once per strength: ``s + Uμ`` (the target in uncentred coordinates) and ``βU`` are formed
    here, so a call is two thin matrix products on the rows it gets, ``r = (s + Uμ) − hUᵀ`` (one
    ``addmm``) and ``h' − h = r (βU)``, the same arithmetic for every row.
    """
    U = basis.to(device=device, dtype=torch.float32)
    U_t = U.T.contiguous()  # [d, k]
    target_raw = target.to(device=device, dtype=torch.float32) + U @ mean.to(device=device, dtype=torch.float32)
    U_beta = beta * U  # [k, d]

    def transform(h: Tensor) -> tuple[Tensor, Tensor]:
        rows = h.reshape(-1, h.shape[-1])  # [n, d]: every position it gets, batch folded in
        residual = torch.addmm(target_raw, rows, U_t, alpha=-1.0)  # [n, k]: s − U(h − μ)
        delta = (residual @ U_beta).reshape(h.shape)
        return h + delta, delta
    return transform
