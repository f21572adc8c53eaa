"""Trace bundles and manifests: round trips, and every kind of inconsistency is refused."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from refute import zoo
from refute.errors import BundleError, CommitmentError, InputError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest, canonical_json
from refute.provider import PreparedModel, prepare_model, read_inputs_json, run_trace
from refute.trace import Trace
from tests.conftest import shared_models


@pytest.fixture(scope="module")
def prepared() -> PreparedModel:
    return prepare_model(zoo.residual_block().onnx_bytes)


@pytest.fixture(scope="module")
def trace(prepared: PreparedModel) -> Trace:
    return run_trace(prepared, zoo.residual_block().sample_input(0), threads=1)


def test_bundle_roundtrip(trace: Trace, tmp_path: Path) -> None:
    path = trace.write(tmp_path / "t.rtrace")
    again = Trace.read(path)
    assert again.commitment == trace.commitment
    assert again.manifest == trace.manifest
    for a, b in zip(again.states, trace.states, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.tobytes() == y.tobytes()
    with zipfile.ZipFile(path) as archive:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())


def test_manifest_roundtrip_and_identity(prepared: PreparedModel) -> None:
    manifest = prepared.manifest
    again = Manifest.from_json(json.loads(canonical_json(manifest.to_json())))
    assert again == manifest
    assert again.sha256 == manifest.sha256
    manifest.check_segmentation(prepared.segmentation)
    assert manifest.tolerances is None and manifest.circuits is None
    assert manifest.num_segments == prepared.segmentation.num_segments


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
             extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            data = edit(info.filename, a.read(info))
            if data is not None:
                b.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            b.writestr(name, data)
    return dst


def _flip_state(k: int) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name == f"states/{k}/0.f32":
            values = np.frombuffer(data, "<f4").copy()
            values[0] += 0.5
            return values.tobytes()
        return data
    return edit


def _edit_json(member: str, change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:  # type: ignore[type-arg]
    def edit(name: str, data: bytes) -> bytes:
        if name != member:
            return data
        doc = json.loads(data)
        change(doc)
        return canonical_json(doc)
    return edit


def test_tampered_state_is_pinpointed(trace: Trace, tmp_path: Path) -> None:
    good = trace.write(tmp_path / "good.rtrace")
    for k in range(len(trace.states)):
        bad = _rewrite(good, tmp_path / f"bad{k}.rtrace", _flip_state(k))
        with pytest.raises(BundleError, match=f"state {k} "):
            Trace.read(bad)


def test_inconsistent_bundles_are_refused(trace: Trace, tmp_path: Path) -> None:
    good = trace.write(tmp_path / "good.rtrace")

    def drop_member(name: str, data: bytes) -> bytes | None:
        return None if name == "states/1/0.f32" else data

    def truncate(name: str, data: bytes) -> bytes:
        return data[:-4] if name == "states/0/0.f32" else data

    def set_leaf(doc: dict) -> None:  # type: ignore[type-arg]
        doc["commitment"]["leaves"][1] = "0x" + "11" * 32

    def flip_value(name: str, data: bytes) -> bytes:
        return (data[:8] + bytes([data[8] ^ 1]) + data[9:]) if name == "states/1/0.f32" else data

    def old_format(doc: dict) -> None:  # type: ignore[type-arg]
        doc["format"] = "refute.trace/1"

    def set_manifest(doc: dict) -> None:  # type: ignore[type-arg]
        doc["manifest_sha256"] = "0" * 64

    def change_scale(doc: dict) -> None:  # type: ignore[type-arg]
        doc["scale"] = 9

    cases: list[tuple[str, Callable[[str, bytes], bytes | None], dict[str, bytes], str]] = [
        ("missing", drop_member, {}, "missing"),
        ("extra", lambda n, d: d, {"../evil": b"x"}, "unexpected"),
        ("size", truncate, {}, "wrong size"),
        ("leaf", _edit_json("trace.json", set_leaf), {}, "root does not match"),
        ("value", flip_value, {}, "state 1 does not match its committed leaf"),
        ("format", _edit_json("trace.json", old_format), {}, "refute.trace/1 bundle"),
        ("manifest", _edit_json("trace.json", set_manifest), {}, "another manifest"),
        ("scale", _edit_json("manifest.json", change_scale), {}, "another manifest"),
    ]
    for label, edit, extra, message in cases:
        bad = _rewrite(good, tmp_path / f"{label}.rtrace", edit, extra)
        with pytest.raises(BundleError, match=message):
            Trace.read(bad)
    (tmp_path / "junk.rtrace").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BundleError, match="not a readable"):
        Trace.read(tmp_path / "junk.rtrace")
    with pytest.raises(BundleError, match="not a readable"):
        Trace.read(tmp_path / "absent.rtrace")


def test_from_states_refuses_wrong_shapes_and_nan(prepared: PreparedModel, trace: Trace) -> None:
    states = [list(s) for s in trace.states]
    with pytest.raises(BundleError, match="states"):
        Trace.from_states(prepared.manifest, states[:-1])
    broken = [list(s) for s in states]
    broken[1][0] = broken[1][0].reshape(-1)
    with pytest.raises(BundleError, match="shape"):
        Trace.from_states(prepared.manifest, broken)
    poisoned = [list(s) for s in states]
    poisoned[1][0] = poisoned[1][0].copy()
    poisoned[1][0].flat[3] = np.inf
    with pytest.raises(CommitmentError, match="non-finite"):
        Trace.from_states(prepared.manifest, poisoned)


def test_shared_model_trace_from_input_json(tmp_path: Path) -> None:
    shared = next(m for m in shared_models() if m.name == "3l_relu_conv_fc")
    prep = prepare_model(shared.path, dims={"batch_size": 1})
    feeds = read_inputs_json(shared.input_json, prep.loaded)
    result = run_trace(prep, feeds)
    assert result.commitment.num_states == prep.segmentation.num_segments + 1
    again = Trace.read(result.write(tmp_path / "x.rtrace"))
    assert again.commitment.root == result.commitment.root


def test_bad_inputs_are_refused(prepared: PreparedModel) -> None:
    good = zoo.residual_block().sample_input(0)
    name = prepared.loaded.input_names[0]
    with pytest.raises(InputError, match="exactly"):
        run_trace(prepared, {})
    with pytest.raises(InputError, match="shape"):
        run_trace(prepared, {name: good[name][0]})
    with pytest.raises(InputError, match="floating"):
        run_trace(prepared, {name: good[name].astype(np.int32)})
    with pytest.raises(InputError, match="NaN"):
        run_trace(prepared, {name: np.full_like(good[name], np.nan)})
    with pytest.raises(InputError, match="input_data"):
        read_inputs_json({"nope": 1}, prepared.loaded)
    with pytest.raises(InputError, match="values"):
        read_inputs_json({"input_data": [[1.0, 2.0]]}, prepared.loaded)


def test_trusted_read_skips_rehash_but_not_structure(trace: Trace, tmp_path: Path) -> None:
    good = trace.write(tmp_path / "good.rtrace")
    fast = Trace.read(good, rehash=False)
    assert fast.commitment == trace.commitment

    def drop_tensor(doc: dict) -> None:  # type: ignore[type-arg]
        doc["states"][1] = []

    bad = _rewrite(good, tmp_path / "bad.rtrace", _edit_json("trace.json", drop_tensor))
    with pytest.raises(BundleError, match="every state with its tensors"):
        Trace.read(bad, rehash=False)
    with pytest.raises(BundleError, match="not a readable"):
        Trace.read(tmp_path / "absent.rtrace", rehash=False)


# --- the provider's optimized run ----------------------------------------------------------


@pytest.mark.parametrize("make", [zoo.cnn, zoo.residual_block, zoo.attention_block,
                                  zoo.multi_output], ids=lambda m: m.__name__)
def test_optimized_run_gives_every_state_close_to_the_deterministic_one(
        make: Callable[[], zoo.ZooModel], tmp_path: Path) -> None:
    model = make()
    prep = prepare_model(model.onnx_bytes)
    feeds = model.sample_input(3)
    exact = run_trace(prep, feeds, deterministic=True)
    fast = run_trace(prep, feeds)
    assert fast.commitment.leaves[0] == exact.commitment.leaves[0]  # the inputs, as given
    for k, (a, b) in enumerate(zip(exact.states, fast.states, strict=True)):
        for spec, x, y in zip(prep.manifest.states[k], a, b, strict=True):
            assert y.dtype == np.float32 and y.shape == spec.shape
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    # A committed optimized run reads back like any trace.
    again = Trace.read(fast.write(tmp_path / "fast.rtrace"))
    assert again.commitment == fast.commitment
    again = run_trace(prep, feeds, executor=DeterministicExecutor())  # an executor: exact
    assert again.commitment == exact.commitment
