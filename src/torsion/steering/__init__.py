"""Steering methods behind one protocol (methods.md, "Comparing steering methods").

Each method is a small frozen value in its own module (``flat``, ``dense``, ``ablation``,
``weighted-ablation``, ``ace``, ``spline-a``, ``spline-b``) that registers itself; adding a
method is adding a module. See :mod:`torsion.steering.base` for the protocol.

Example::

    from torsion.steering import get_method, load_method
    method = get_method("ace", vectors=v, means=mu, layers=[12])
    with method.apply(lm, 2.0) as record: ...
    method.save("ace.safetensors"); load_method("ace.safetensors", lm=lm)
"""

from torsion.steering.base import MethodRecord, SteeringMethod
from torsion.steering.io import load_method, save_method
from torsion.steering.registry import get_method, method_names

__all__ = ["MethodRecord", "SteeringMethod", "get_method", "load_method", "method_names", "save_method"]
