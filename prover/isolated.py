"""Heavy EZKL work in a fresh Python process each time, bounded in time, its peak memory measured.

EZKL 23 does not give back what a proving key setup or a proof allocated when the call returns
(the Rust allocator keeps it for the process): three MobileNet v1 tile proofs in one process
(each 4.7–6.6 GB alone) grew it past 23 GB, and the kernel killed it. Each setup and proof
therefore runs in a child interpreter (not a fork: EZKL's thread pool does not survive one, and a
Celery prefork worker is a daemon that may not start multiprocessing children), whose memory is
all returned when it exits. The child reports its peak resident set (``VmHWM``), which the
caller records beside the estimate of :mod:`prover.budget`. Calibration children
(:mod:`prover.calibration`) run the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prover.errors import ProverError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ChildFailed(ProverError):
    """A child process ran out of time, died, or raised; ``reason`` says which, with the last
    line it printed."""

    code = "child_failed"


@dataclass(frozen=True)
class ChildOutcome:
    """What a child returned, with its peak resident memory and wall-clock time."""

    value: Any
    peak_bytes: int
    seconds: float


def last_message(log: Path) -> str:
    """The most telling line of a child's output: its last complaint, else its last line."""
    try:
        lines = [_ANSI.sub("", line).strip()
                 for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [line for line in lines if line and not set(line) <= set("+-|= ")]
    complaints = [line for line in lines if re.search(r"error|fail|panic", line, re.IGNORECASE)]
    last = (complaints or lines or ["no output"])[-1]
    return last[:200]


def _kill(child: subprocess.Popen[bytes]) -> None:
    """End ``child`` (and anything it started: it leads its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def run_child(entry: str, job: Any, *, timeout_s: float, what: str, hint: str = "") -> ChildOutcome:
    """Call ``entry`` (``"module:function"``, a top-level function of this code base) on
    ``job`` in a fresh interpreter and return its result; the child is killed after
    ``timeout_s`` seconds (``hint`` names the setting that sets it). ``job`` and the result
    travel as pickles between this process and its own child. Raises :class:`ChildFailed`
    naming ``what`` on a timeout, a death (e.g. the kernel's OOM killer) or an exception."""
    with tempfile.TemporaryDirectory(prefix="refute-child-") as tmp:
        job_file, result, log = Path(tmp) / "job", Path(tmp) / "result", Path(tmp) / "log"
        job_file.write_bytes(pickle.dumps((entry, job, timeout_s, os.getpid())))
        root = str(Path(__file__).absolute().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        start = time.monotonic()
        with log.open("wb") as output:
            child = subprocess.Popen(
                [sys.executable, "-c", "from prover.isolated import _main; _main()",
                 str(job_file), str(result)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill(child)
                limit = f" ({hint})" if hint else ""
                raise ChildFailed(f"{what} gave up after {timeout_s:g} s{limit}; EZKL's last "
                                  f"message: {last_message(log)}") from None
            except BaseException:  # interrupted: leave nothing running
                _kill(child)
                raise
        if child.returncode != 0 or not result.exists():
            killed = child.returncode == -signal.SIGKILL
            cause = "killed (out of memory?)" if killed else f"died (exit {child.returncode})"
            raise ChildFailed(f"{what} process {cause}: {last_message(log)}")
        status, value, peak = pickle.loads(result.read_bytes())  # written by our own child
        if status == "raised":
            raise ChildFailed(f"{what} failed: {value}")
        return ChildOutcome(value, peak, time.monotonic() - start)


def _peak_rss() -> int:
    """This process's peak resident memory since it exec'd (``VmHWM``: ``ru_maxrss`` would
    also count the parent's resident set it was forked with, which survives the exec)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (``PR_SET_PDEATHSIG``, Linux),
    and exit now if the parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _main() -> None:
    """Entry point of a child: ``argv = [job, result]`` (pickles written by :func:`run_child`).

    The child ends with its parent (a prove worker killed mid-proof leaves no proof running:
    :func:`_die_with`), and ends itself a little after its limit (SIGALRM, whose default action
    needs no Python code to run while EZKL holds the GIL)."""
    job_file, result = Path(sys.argv[1]), Path(sys.argv[2])
    entry, job, limit_s, parent = pickle.loads(job_file.read_bytes())  # from our own parent
    _die_with(parent)
    signal.alarm(math.ceil(limit_s) + 10)
    module, name = entry.split(":")
    work = getattr(importlib.import_module(module), name)
    try:
        outcome: tuple[str, Any] = ("returned", work(job))
    except Exception as exc:  # reported to the parent, which raises it as its own error
        text = str(exc).strip().splitlines()
        outcome = ("raised", f"{type(exc).__name__}: {text[0] if text else ''}"[:300])
    peak = _peak_rss()
    tmp = result.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps((*outcome, peak)))
    tmp.replace(result)
