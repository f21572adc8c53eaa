"""Real servers for tests, on free loopback ports, stopped afterwards: PostgreSQL (and Redis)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} not found: run scripts/bootstrap (apt postgresql)")
    return candidates[-1]


def _as_postgres(args: list[str]) -> list[str]:
    """Run as the postgres user when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields its SQLAlchemy URL.

    The cluster lives in its own folder under the system temp dir (which the ``postgres`` user
    can reach, unlike pytest's private tmp dirs) and is removed afterwards.
    """
    workdir = Path(tempfile.mkdtemp(prefix="refute-pg-"))
    data = workdir / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(data, "postgres")
    done = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U",
                                        "refute", "--no-sync"]), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr.strip()[-400:]}")
    port = free_port()
    log = workdir / "pg.log"
    server = subprocess.Popen(
        _as_postgres([_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                      "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run([_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True, check=False)
            if ready.returncode == 0:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-500:]}")
            time.sleep(0.2)
        yield f"postgresql+psycopg://refute@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
