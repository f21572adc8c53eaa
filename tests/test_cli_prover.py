"""`refute calibrate`, `refute trace --manifest`, `refute prove` and `refute verify [--chain]`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import shared_models

pytestmark = [pytest.mark.slow, pytest.mark.ezkl, pytest.mark.chain]

MODEL = next(m for m in shared_models() if m.name == "1l_mlp")


def _refute(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFUTE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "verifier", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_calibrate_trace_prove_verify(tmp_path: Path) -> None:
    home = tmp_path / "home"
    manifest = tmp_path / "m.json"
    done = _refute(home, "calibrate", MODEL.path, "--dim", "batch_size=1", "-o", manifest,
                   "--input", MODEL.input_json)
    assert done.returncode == 0, done.stderr
    assert "step 1   τ=" in done.stdout and "range R=" in done.stdout
    bundle = tmp_path / "t.rtrace"
    done = _refute(home, "trace", MODEL.path, MODEL.input_json, "--manifest", manifest,
                   "-o", bundle)
    assert done.returncode == 0, done.stderr
    proof = tmp_path / "p.rproof"
    done = _refute(home, "prove", MODEL.path, "1", bundle, "-o", proof)
    assert done.returncode == 0, done.stderr
    assert "verdict  CHALLENGER_FAULT" in done.stdout
    assert "UNSAFE development SRS" in done.stdout
    done = _refute(home, "verify", proof, "--chain")
    assert done.returncode == 0, done.stderr
    assert "eth_call=valid" in done.stdout and "tx=ok" in done.stdout
    # A step outside the model and a corrupt proof bundle fail with one line.
    done = _refute(home, "prove", MODEL.path, "7", bundle)
    assert done.returncode == 2 and done.stderr.count("error:") == 1
    (tmp_path / "junk.rproof").write_bytes(b"junk")
    done = _refute(home, "verify", tmp_path / "junk.rproof")
    assert done.returncode == 2 and "not a readable proof bundle" in done.stderr
    # The bundle carries the states the proof was made on: one edited value is refused.
    edited = tmp_path / "edited.rproof"
    with zipfile.ZipFile(proof) as source, zipfile.ZipFile(edited, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "states/1/0.f32":
                data = bytes([data[0] ^ 1]) + data[1:]
            target.writestr(info, data)
    done = _refute(home, "verify", edited)
    assert done.returncode == 2 and "revealed state 1 does not match its committed leaf" \
        in done.stderr, done.stderr
