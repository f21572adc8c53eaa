"""The provider's optimized run with a spool file: ONNX Runtime writes the states into a file
mapping, and everything downstream (the range rule, the leaves, the bundle) reads the same
values as from the in-memory run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refute import zoo
from refute.errors import InputError
from refute.provider import prepare_model, random_inputs, run_trace
from refute.provider_session import StateSession
from refute.trace import Trace

ZOO = {m.name: m for m in zoo.all_models()}


@pytest.mark.parametrize("name", ["mlp_8x256", "residual_block", "attention_block",
                                  "multi_output"])
def test_spooled_states_are_the_in_memory_states(name: str, tmp_path: Path) -> None:
    """Tensors carried through several states (residual_block, attention_block, multi_output)
    get one region of the spool; the states equal the in-memory run's bit for bit and are
    views of the file."""
    prepared = prepare_model(ZOO[name].onnx_bytes)
    session = StateSession(prepared.segmentation, threads=1)
    feeds = random_inputs(prepared.loaded, seed=3)
    in_memory = session.run(feeds)
    spool = tmp_path / "t.spool"
    spooled = session.run(feeds, spool=spool)
    on_disk = spool.read_bytes()
    for a, b in zip(in_memory, spooled, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
            assert isinstance(y.base, np.memmap) or isinstance(y, np.memmap)
            assert y.tobytes() in on_disk
    with pytest.raises(InputError, match="needs a file of its own"):
        session.run(feeds, spool=spool)  # would rewrite the states above
    assert spool.read_bytes() == on_disk


def test_a_spooled_trace_commits_and_writes_the_same_bundle(tmp_path: Path) -> None:
    prepared = prepare_model(ZOO["residual_block"].onnx_bytes)
    inputs = random_inputs(prepared.loaded, seed=5)
    plain = run_trace(prepared, inputs)
    spooled = run_trace(prepared, inputs, spool=tmp_path / "s.spool")
    assert spooled.commitment == plain.commitment
    read = Trace.read(spooled.write(tmp_path / "s.rtrace"))
    assert read.commitment == plain.commitment
    with pytest.raises(InputError, match="optimized provider run"):
        run_trace(prepared, inputs, spool=tmp_path / "d.spool", deterministic=True)
