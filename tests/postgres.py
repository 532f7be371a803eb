"""A throwaway PostgreSQL server on loopback for one test module, from the system's binaries.

``make test`` installs Debian's ``postgresql`` when it is missing. The server runs as the
``postgres`` user when the tests run as root (PostgreSQL refuses to run as root), listens on
127.0.0.1 only, trusts local connections, and is stopped and deleted afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    candidates = [os.environ.get("TORSION_PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def postgres_server(bindir: Path) -> Iterator[str]:
    """Start a server; yield a SQLAlchemy URL of an empty database; stop and delete it."""
    root = Path(tempfile.mkdtemp(prefix="torsion-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        root.chmod(0o700)
    run = lambda *args: subprocess.run(_as_server_user([str(a) for a in args]), check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "start",
            "-o", f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}")
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "torsion_test")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/torsion_test"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
