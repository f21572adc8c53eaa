"""`refute demo` runs a real dispute end to end and stops everything it started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ezkl, pytest.mark.chain]


def _our_processes() -> set[int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True,
                             check=True).stdout
    return {int(line.split()[0]) for line in listing.splitlines()[1:]
            if "redis-server" in line or "refute worker" in line or "refute serve" in line}


def test_demo(tmp_path: Path) -> None:
    before = _our_processes()
    done = subprocess.run([sys.executable, "-m", "verifier", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "refute demo: summary" in done.stdout and "FINALIZED" in done.stdout
    # Exit 0 means every expectation held (run_demo checks the verdicts and the replays).
    assert done.stdout.count("verified on anvil") == 2
    bundles = sorted(tmp_path.glob("*.rdispute"))
    assert len(bundles) == 2
    key = re.search(r"refute replay <bundle> --key (0x[0-9a-f]+)", done.stdout)
    assert key is not None, done.stdout[-2000:]
    replay = subprocess.run([sys.executable, "-m", "verifier", "replay", str(bundles[0]),
                             "--key", key.group(1)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert replay.returncode == 0 and "FAIL" not in replay.stdout
    assert _our_processes() <= before  # nothing left running
