"""``refute serve`` as a real process on a fresh home, for tests that attack the running API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.servers import free_port, stop_process


@dataclass
class Server:
    """A running ``refute serve`` process."""

    process: subprocess.Popen[bytes]
    port: int
    home: Path

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        """The server process's resident set (VmRSS, KiB) from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def worker_pids(self) -> list[int]:
        """The worker processes of a ``--workers N`` server (its children running uvicorn)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and b"spawn_main" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def alive(self) -> bool:
        """Whether the process still runs and answers its health route."""
        return self.process.poll() is None and httpx.get(
            f"{self.url}/v1/health", timeout=10).status_code == 200

    def log(self) -> str:
        """What the server wrote to its stdout and stderr so far."""
        return (self.home / "serve.log").read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the process (kill it if it does not stop within 20 s)."""
        stop_process(self.process)


def start_server(home: Path, env: dict[str, str] | None = None, *, workers: int = 1) -> Server:
    """``refute serve --workers workers`` with HOME=``home`` and no REFUTE_* settings but
    ``env`` (so the defaults: a SQLite file under ``home/.cache/refute`` that nobody
    migrated)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REFUTE_")}
    environment["HOME"] = str(home)
    environment.update(env or {})
    port = free_port()
    refute = str(Path(sys.executable).with_name("refute"))
    log = (home / "serve.log").open("wb")
    process = subprocess.Popen([refute, "serve", "--port", str(port), "--workers", str(workers)],
                               env=environment,
                               stdout=log, stderr=subprocess.STDOUT, cwd=home)
    server = Server(process, port, home)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {server.log()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError("serve did not answer within 60 s")
