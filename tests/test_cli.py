"""The command line: `refute segment`, `refute trace`, `refute inspect`, and clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from refute.trace import Trace
from tests.conftest import shared_models

SHARED = {m.name: m for m in shared_models()}


def _refute(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "verifier", *map(str, args)],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_segment_prints_table_and_json() -> None:
    model = SHARED["3l_relu_conv_fc"]
    done = _refute("segment", model.path, "--dim", "batch_size=1")
    assert done.returncode == 0, done.stderr
    assert "3 segments" in done.stdout and "Conv" in done.stdout
    done = _refute("segment", model.path, "--dim", "batch_size=1", "--json", "--max-segments", "2")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["format"] == "refute.manifest/2"
    assert len(manifest["segments"]) == 2


@pytest.mark.slow
def test_trace_writes_a_verifiable_bundle(tmp_path: Path) -> None:
    model = SHARED["2l_relu_sigmoid_conv"]
    bundle = tmp_path / "out.rtrace"
    done = _refute("trace", model.path, model.input_json, "--dim", "batch_size=1", "-o", bundle)
    assert done.returncode == 0, done.stderr
    root = Trace.read(bundle).commitment.root
    assert f"root     0x{root.hex()}" in done.stdout
    assert "Executing the model" in done.stderr  # progress is shown
    done = _refute("inspect", bundle)
    assert done.returncode == 0, done.stderr
    assert f"0x{root.hex()}" in done.stdout


def test_failures_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    model = SHARED["1l_mlp"]
    bundle = tmp_path / "never.rtrace"
    cases = [
        ("trace", model.path, SHARED["3l_relu_conv_fc"].input_json, "--dim", "batch_size=1",
         "-o", bundle),  # wrong number of input values
        ("segment", tmp_path / "missing.onnx"),
        ("segment", model.input_json),  # not a model
        ("segment", model.path, "--dim", "batch_size=1", "--cuts", "5"),
        ("inspect", model.input_json),
    ]
    for args in cases:
        done = _refute(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert not bundle.exists()
    # The input file pins the symbolic batch (it used to need --dim batch_size=1), and says so.
    done = _refute("trace", model.path, model.input_json, "-o", bundle)
    assert done.returncode == 0, done.stderr
    assert "pinned batch_size=1 (input[0], input file)" in done.stderr and bundle.exists()
    done = _refute("segment", model.path, "--dim", "batch_size=x")
    assert done.returncode == 2 and "NAME=INTEGER" in done.stderr


def test_trace_spools_the_states_and_removes_the_spool(tmp_path: Path) -> None:
    model = SHARED["1l_mlp"]
    plain, spooled = tmp_path / "plain.rtrace", tmp_path / "spooled.rtrace"
    for bundle, extra in ((plain, ()), (spooled, ("--spool",))):
        done = _refute("trace", model.path, model.input_json, "-o", bundle, *extra)
        assert done.returncode == 0, done.stderr
    assert Trace.read(spooled).commitment == Trace.read(plain).commitment
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.rtrace", "spooled.rtrace"]
    # A file in the spool's place is not the command's to overwrite or remove.
    (tmp_path / "again.rtrace.spool").write_bytes(b"keep me")
    done = _refute("trace", model.path, model.input_json, "-o", tmp_path / "again.rtrace",
                   "--spool")
    assert done.returncode == 2 and "needs a file of its own" in done.stderr
    assert (tmp_path / "again.rtrace.spool").read_bytes() == b"keep me"
    assert not (tmp_path / "again.rtrace").exists()
