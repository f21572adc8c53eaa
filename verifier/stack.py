"""The whole local stack as processes: redis-server, the API and the workers.

:class:`LocalStack` starts everything on free loopback ports under one folder, waits until the
API is ready, and stops what it started (workers, API, then Redis) on exit. ``refute stack``
runs it in the foreground; tests and the demo use it as a context manager.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from refute.errors import RefuteError
from verifier.db import migrate


class StackError(RefuteError):
    """A process of the local stack failed to start."""

    code = "stack_error"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: A process of the stack is sent SIGTERM by the kernel when the process that started it dies
#: (``PR_SET_PDEATHSIG`` through util-linux's ``setpriv``), so a killed test run or demo leaves
#: no server or worker behind; its own session keeps it out of the owner's terminal signals.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]
#: The kernel sends that signal when the *thread* that started the process ends, so every process
#: of a stack is started from this one long-lived thread: one started from a short-lived thread
#: (a fault drill restarting redis-server from a worker thread) would be killed with it.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refute-stack-spawner")


def flower_command(port: int, *, address: str = "127.0.0.1") -> list[str]:
    """Flower (the Celery monitor) on ``address:port``, watching the workers through the broker
    the settings name (``REFUTE_REDIS_URL``, read by ``verifier.worker``'s Celery app)."""
    return [sys.executable, "-m", "celery", "-A", "verifier.worker", "flower",
            f"--address={address}", f"--port={port}"]


class LocalStack:
    """redis-server + ``refute serve`` + ``refute worker`` processes on loopback, and Flower
    beside them when asked (``flower=True``: :attr:`flower_url`). The API runs ``api_workers``
    processes (``refute serve --workers``; one by default, so a test's kill hits the server)."""

    def __init__(self, workdir: Path, *, admin_token: str | None = None,
                 extra_env: dict[str, str] | None = None, flower: bool = False,
                 api_workers: int = 1) -> None:
        self.workdir = workdir.resolve()
        self.admin_token = admin_token or secrets.token_urlsafe(16)
        self.redis_port = _free_port()
        self.api_port = _free_port()
        self.flower_port = _free_port() if flower else None
        self.api_workers = api_workers
        self.extra_env = dict(extra_env or {})
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._commands: dict[str, list[str]] = {}
        self._envs: dict[str, dict[str, str]] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def api_url(self) -> str:
        """Base URL of the API."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        """Base URL of Flower (the stack was made with ``flower=True``)."""
        if self.flower_port is None:
            raise StackError("this stack runs no Flower (LocalStack(..., flower=True))")
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment every process of the stack runs with."""
        return {
            **os.environ,
            "REFUTE_DATABASE_URL": f"sqlite:///{self.workdir / 'refute.db'}",
            "REFUTE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "REFUTE_BLOB_DIR": str(self.workdir / "blobs"),
            "REFUTE_HOME": str(self.workdir / "home"),
            "REFUTE_SPOT_KEY": self._spot_key(),
            "REFUTE_ADMIN_TOKEN": self.admin_token,
            **self.extra_env,
        }

    def _spot_key(self) -> str:
        path = self.workdir / "spot.key"
        if not path.exists():
            path.write_text(secrets.token_hex(32))
        return path.read_text().strip()

    def _spawn(self, name: str, args: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(log)
        own_env = dict(env if env is not None else self._envs.get(name, {}))
        if shutil.which(_DIE_WITH_PARENT[0]) is None:
            raise StackError("setpriv not found (Debian package util-linux): run scripts/bootstrap")
        process = _SPAWNER.submit(
            subprocess.Popen, [*_DIE_WITH_PARENT, *args], env={**self.env, **own_env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.workdir).result()
        self._processes.append((name, process))
        self._commands[name] = args
        self._envs[name] = own_env
        return process

    def add_worker(self, name: str, queues: str, *, extra_env: dict[str, str] | None = None,
                   concurrency: int = 1, beat: bool = False) -> subprocess.Popen[bytes]:
        """Start one more ``refute worker`` on ``queues`` (comma-separated) with its own extra
        environment on top of the stack's (kept for :meth:`restart`)."""
        if name in self.names():
            raise StackError(f"a process called {name!r} is already running")
        args = [sys.executable, "-m", "verifier", "worker", "--queues", queues,
                "--concurrency", str(concurrency), "--loglevel", "WARNING"]
        if beat:
            args.append("--beat")
        return self._spawn(name, args, dict(extra_env or {}))

    def names(self) -> list[str]:
        """The processes of this stack that are running now."""
        return [name for name, process in self._processes if process.poll() is None]

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The running process called ``name`` (``api``, ``worker-prove``, …)."""
        for known, process in reversed(self._processes):
            if known == name:
                return process
        raise StackError(f"no process called {name!r} in this stack")

    def kill(self, name: str) -> None:
        """SIGKILL one process and its children (a crash drill: nothing gets to clean up)."""
        process = self.process(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self._processes = [(n, p) for n, p in self._processes if p is not process]

    def restart(self, name: str, *, timeout: float = 60.0) -> None:
        """Start a killed process again with its original command and environment, and wait
        until it serves: Redis until it answers a ping, anything else until the API is ready
        (which needs Redis too)."""
        if any(known == name and p.poll() is None for known, p in self._processes):
            raise StackError(f"{name} is still running: kill it first")
        if name not in self._commands:
            raise StackError(f"no process called {name!r} in this stack")
        self._spawn(name, self._commands[name])
        if name == "redis":
            self._wait_redis(timeout)
        else:
            self._wait_ready(timeout)

    def _wait_redis(self, timeout: float) -> None:
        """Wait until redis-server answers PING (RESP, no client library needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process("redis").poll() is not None:
                tail = (self.workdir / "redis.log").read_text(errors="replace")[-400:]
                raise StackError(f"redis exited: {tail.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as sock:
                    sock.settimeout(2)
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise StackError(f"redis did not answer within {timeout:.0f} s")

    def start(self) -> Self:
        """Start Redis, migrate the database, start the API and the workers; wait for ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        redis = shutil.which("redis-server")
        if redis is None:
            raise StackError("redis-server not found: run scripts/bootstrap")
        try:
            self._spawn("redis", [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                  "--dir", str(self.workdir), "--appendonly", "yes",
                                  "--appendfsync", "everysec", "--save", ""])
            migrate(self.env["REFUTE_DATABASE_URL"])
            refute = [sys.executable, "-m", "verifier"]
            self._spawn("api", [*refute, "serve", "--port", str(self.api_port),
                                "--workers", str(self.api_workers)])
            self._spawn("worker-spotcheck", [*refute, "worker", "--queues", "spotcheck",
                                             "--loglevel", "WARNING"])
            self._spawn("worker-prove", [*refute, "worker", "--queues", "prove",
                                         "--loglevel", "WARNING"])
            self._spawn("worker-timers", [*refute, "worker", "--queues", "timers", "--beat",
                                          "--loglevel", "WARNING"])
            if self.flower_port is not None:
                self._spawn("flower", flower_command(self.flower_port))
            self._wait_ready()
            if self.flower_port is not None:
                self._wait_ready(url=f"{self.flower_url}/healthcheck")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 60.0, *, url: str | None = None) -> None:
        """Wait until ``url`` (the API's readiness) answers 200, while every process runs."""
        url = url or f"{self.api_url}/v1/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self._processes:
                if process.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-400:]
                    raise StackError(f"{name} exited with {process.returncode}: {tail.strip()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise StackError(f"the API was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop every process this stack started (workers and API first, Redis last)."""
        for _name, process in reversed(self._processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for _name, process in reversed(self._processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
