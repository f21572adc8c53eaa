"""prover.isolated: heavy work in a child interpreter, bounded in time, measured, and never
outliving the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prover.isolated import ChildFailed, run_child

ROOT = Path(__file__).resolve().parents[1]


def test_a_child_returns_its_value_with_its_peak_memory() -> None:
    done = run_child("math:factorial", 20, timeout_s=60, what="factorial")
    assert done.value == 2432902008176640000
    assert 2**20 < done.peak_bytes < 2**28 and done.seconds > 0  # its own, not its parent's


def test_an_exception_a_timeout_and_a_kill_are_reported_as_such() -> None:
    with pytest.raises(ChildFailed, match=r"^sqrt failed: ValueError: math domain error"):
        run_child("math:sqrt", -1, timeout_s=60, what="sqrt")
    with pytest.raises(ChildFailed, match=r"sleep gave up after 1 s \(SOME_SETTING\)"):
        run_child("time:sleep", 30, timeout_s=1, what="sleep", hint="SOME_SETTING")
    with pytest.raises(ChildFailed, match=r"^work process killed \(out of memory\?\)"):
        run_child("tests.test_isolated:_kill_self", None, timeout_s=60, what="work")


def _kill_self(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_child_dies_with_its_parent() -> None:
    """A prove worker killed mid-proof leaves no proof running."""
    parent = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from prover.isolated import run_child\n"
        "run_child('time:sleep', 120, timeout_s=300, what='sleep')\n")])
    deadline = time.monotonic() + 30
    while not (children := _children(parent.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children, "the child never started"
    time.sleep(1.0)  # let it reach its work (prctl is its first step)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() for c in children)
