"""Starting the server: the shared state from start-up options, uvicorn in a thread or in the foreground.

Example::

    state = build_state(lm, vectors=[("refusal", "runs/quick/vectors.safetensors", "md/resid")])
    with ServerThread(state) as server:     # 127.0.0.1, a free port
        OpenAI(base_url=server.url, api_key="none").chat.completions.create(...)
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torsion.errors import TorsionError
from torsion.models import LoadedModel, load_model
from torsion.serve.app import MAX_BODY_BYTES, ServeState, create_app
from torsion.serve.condition import check_condition, load_condition
from torsion.serve.engine import Engine
from torsion.serve.steering import RequestError, VectorRegistry, resolve_steering


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from_env(name: str | None, host: str) -> str | None:
    """The key in environment variable ``name``; a non-loopback ``host`` requires one."""
    if name is None:
        if not is_loopback(host):
            raise TorsionError(f"binding {host} (not loopback) needs an API key; pass --api-key-env NAME with the "
                               "key in environment variable NAME, or bind 127.0.0.1")
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise TorsionError(f"environment variable {name} is unset or empty; export the API key in it")
    return key


def build_state(lm: LoadedModel, *, vectors: Sequence[tuple[str, str | Path, str | None]] = (),
                method_files: Sequence[tuple[str, str | Path]] = (), conditions: Sequence[tuple[str, str | Path]] = (),
                default_steering: Mapping[str, Any] | None = None,
                max_batch_size: int = 8, batch_window_ms: float = 20.0, continuous: bool = True,
                max_applied_norm: float | None = None, api_key: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES) -> ServeState:
    """Load the named vectors (``NAME, FILE, KEY``), method files and conditions (``NAME, FILE``); check the default.

    ``continuous``: requests join running batches (else static batches; see :mod:`torsion.serve.engine`).
    """
    from torsion.steering import load_method
    from torsion.vector_file import load_vector

    registry = VectorRegistry(lm)
    loaded = {}
    try:
        for name, path, key in vectors:
            vector = load_vector(path, key, d_model=lm.d_model)
            registry.add(name, vector.directions, source=f"{path}:{key}" if key else str(path), meta=vector.meta)
        for name, path in method_files:
            registry.add_method(name, load_method(path, lm=lm), source=str(path))
        for name, path in conditions:
            condition = load_condition(path, name=name)
            check_condition(condition, lm)
            loaded[name] = condition
        default = None if default_steering is None else resolve_steering(
            dict(default_steering), lm, registry, loaded, max_applied_norm=max_applied_norm)
    except RequestError as error:
        raise TorsionError(f"start-up steering: {error}") from None
    engine = Engine(lm, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1000, continuous=continuous)
    return ServeState(lm, engine, registry, loaded, default, max_applied_norm, api_key, max_body_bytes)


def _uvicorn(state: ServeState, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(create_app(state), log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class ServerThread:
    """uvicorn serving ``state`` in a daemon thread on ``host:port`` (0 = a free port); a context manager."""

    def __init__(self, state: ServeState, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 timeout: float = 30.0) -> None:
        if state.api_key is None:
            api_key_from_env(None, host)  # refuses a non-loopback host without a key
        self.state, self.host, self.timeout = state, host, timeout
        self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self._socket.getsockname()[1]
        self._server = _uvicorn(state, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="torsion-serve-http")

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://host:port/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def requests_served(self) -> int:
        """Generation requests accepted so far."""
        return self.state.engine.stats["requests"]

    def __enter__(self) -> ServerThread:
        self.state.engine.start()
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TorsionError(f"the server did not start on {self.host}:{self.port}; check the address")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self.timeout)
        self.state.engine.close()
        self._socket.close()


def run_server(model_spec: str, host: str = "127.0.0.1", port: int = 8000, *,
               vectors: Sequence[tuple[str, Path, str | None]] = (), method_files: Sequence[tuple[str, Path]] = (),
               conditions: Sequence[tuple[str, Path]] = (),
               default_steering: Mapping[str, Any] | None = None, max_batch_size: int = 8,
               batch_window_ms: float = 20.0, continuous: bool = True, max_applied_norm: float | None = None,
               api_key_env: str | None = None,
               dtype: str = "float32", device: str = "cpu", log: Callable[[str], None] = print) -> None:
    """Load ``model_spec`` and serve until interrupted (Ctrl-C); ``log`` gets the base URL."""
    api_key = api_key_from_env(api_key_env, host)  # before the model loads: a missing key fails fast
    lm = load_model(model_spec, dtype=dtype, device=device)
    state = build_state(lm, vectors=vectors, method_files=method_files, conditions=conditions,
                        default_steering=default_steering,
                        max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, continuous=continuous,
                        max_applied_norm=max_applied_norm, api_key=api_key)
    with ServerThread(state, host, port, log_level="info") as server:
        names = ", ".join(v["name"] for v in state.vectors.listing()) or "none"
        default = state.default_steering
        note = "unsteered" if default is None else f"default steering {default.metadata(None)}"
        log(f"torsion serve: {lm.model_id} at {server.url} (vectors: {names}; {note}; "
            f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops")
        try:
            while server._thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
