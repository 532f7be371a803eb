"""Method names to classes, with parameters checked against each method's signature.

A method module registers its class with :func:`register`. The modules of this package are
imported the first time a name is looked up (not at ``import torsion.steering``), so adding a
method is adding one module here. Names use hyphens (``weighted-ablation``); underscores are
accepted too.

Example::

    get_method("ace", vectors=v, means=mu, layers=[12])
    get_method("flat", vectors=v, layers=[12], alpah=2)   # TorsionError: unknown parameter 'alpah' ...
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from torsion.errors import TorsionError

_METHODS: dict[str, type] = {}
_NOT_METHODS = {"base", "registry", "io", "hooks", "cli", "from_run"}

M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    """Class decorator: make ``cls`` reachable as ``get_method(cls.name, ...)``."""
    _METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    import torsion.steering as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"torsion.steering.{info.name}")


def method_names() -> list[str]:
    """Every registered method name, sorted."""
    _discover()
    return sorted(_METHODS)


def method_class(name: str) -> type:
    """The class registered as ``name``; an unknown name fails naming the known ones."""
    _discover()
    key = name.replace("_", "-")
    if key not in _METHODS:
        raise TorsionError(f"unknown steering method {name!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def parameters(cls: type) -> tuple[list[str], list[str]]:
    """``(required, optional)`` parameter names of a method class, in declaration order."""
    required, optional = [], []
    for f in fields(cls):
        if not f.init:
            continue
        (required if f.default is MISSING and f.default_factory is MISSING else optional).append(f.name)
    return required, optional


def get_method(name: str, **params: Any) -> Any:
    """Build method ``name`` from ``params``; an unknown, misspelled or missing parameter fails in one line."""
    cls = method_class(name)
    required, optional = parameters(cls)
    valid = required + optional
    for given in params:
        if given not in valid:
            close = difflib.get_close_matches(given, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TorsionError(f"unknown parameter {given!r} for steering method {cls.name}{hint}; "
                               f"valid: {', '.join(valid)}")
    missing = [p for p in required if p not in params]
    if missing:
        raise TorsionError(f"steering method {cls.name} needs {', '.join(missing)}; valid parameters: "
                           f"{', '.join(valid)}")
    return cls(**params)
