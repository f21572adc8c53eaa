"""The safe loader refuses every hostile model with the right typed error and a one-line reason.

The corpus lives in :mod:`tests.hostile_models`. Besides the error class, these tests check that
loading never opens any file but the model's own path: ``open``/``os.open``/``Path.open`` are
recorded, and on Linux inotify watches the directories where the external-data cases point
(which catches opens from C++ code too, e.g. ONNX's checker or ONNX Runtime). Refusals must
also be cheap: while a hostile model loads, the address space is capped (so a loader that tries
to materialize a claimed multi-GiB tensor fails fast instead of exhausting the machine) and the
Python heap's peak, numpy included, is measured.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import importlib
import io
import os
import resource
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refute.errors import ModelRejected, ModelTooLarge, RefuteError
from refute.loading import LoadedModel, LoadLimits, load_model
from tests.conftest import SHARED_MODELS_LOADING, load_shared
from tests.hostile_models import (
    EXTERNAL_CASES,
    HOSTILE,
    INPUT_NAME,
    OUTPUT_NAME,
    SECRET_ABS,
    VALUE_CASES,
    Builder,
    accepted_errors,
    constant_weight_model,
    dynamic_model_bytes,
    five_nodes,
    intermediate_broadcast,
    many_nodes,
    node_without_outputs,
    second_symbolic_dim,
    shapeless_input,
    shared_weight_chain,
    valid_model_bytes,
    valid_model_proto,
    weight_below_circuit_bound,
)

#: protobuf's DecodeError (looked up dynamically: protobuf ships without type stubs).
DecodeError: type[Exception] = importlib.import_module("google.protobuf.message").DecodeError

_SHARED = Path(os.environ.get("REFUTE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_MODELS = sorted((_SHARED / "models").glob("*/network.onnx"))

#: Real files planted where the external-data cases point (relative to the model's directory).
SECRET_BYTES = bytes(range(48))
WEIGHTS_BYTES = bytes(range(100, 148))

HOSTILE_PARAMS = [
    pytest.param(case_id, builder, expected, kwargs, id=case_id)
    for case_id, builder, expected, kwargs in HOSTILE
]
EXTERNAL_PARAMS = [p for p in HOSTILE_PARAMS if p.id in EXTERNAL_CASES]


# --- helpers -------------------------------------------------------------------------------


def _check_rejection(err: BaseException, accepted: tuple[type[ModelRejected], ...]) -> None:
    """``err`` is one of the accepted classes (or a subclass) and explains itself in one line."""
    assert isinstance(err, RefuteError)
    assert isinstance(err, ModelRejected)
    assert issubclass(type(err), accepted), f"{type(err).__name__}: {err}"
    reason = err.reason
    assert isinstance(reason, str)
    assert reason.strip(), "empty reason"
    assert "\n" not in reason and "\r" not in reason, f"multi-line reason: {reason!r}"
    assert len(reason) < 200, f"reason too long ({len(reason)} chars): {reason!r}"
    assert isinstance(err.code, str) and err.code


#: Python-heap (numpy included) a refusal may take: far below what any hostile case claims.
MAX_REFUSAL_MEMORY = 32 * 2**20
#: Address space a load may add: a loader that tries to materialize a claimed tensor of many
#: GiB gets a MemoryError instead of exhausting the machine (or being killed by the OOM killer).
ADDRESS_SPACE_HEADROOM = 2 * 2**30


def _vm_size() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def _memory_guard() -> Iterator[list[int]]:
    """Cap the address space while the block runs; yield a list receiving the traced peak."""
    peak: list[int] = []
    vm_size = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = None if vm_size is None else vm_size + ADDRESS_SPACE_HEADROOM
    if cap is not None and hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if cap is not None and soft != resource.RLIM_INFINITY and soft <= cap:
        cap = None  # already tighter
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    if cap is not None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield peak
    finally:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        peak.append(tracemalloc.get_traced_memory()[1])
        if not was_tracing:
            tracemalloc.stop()


def _real(path: str) -> str:
    return os.path.realpath(path)


@contextlib.contextmanager
def _record_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record the (resolved) paths opened through Python's file APIs while the block runs."""
    opened: list[str] = []
    real_open = builtins.open
    real_os_open = os.open
    real_path_open = Path.open

    def note(file: object) -> None:
        if isinstance(file, str | bytes | os.PathLike):
            opened.append(_real(os.fsdecode(file)))

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_open(file, *args, **kwargs)

    def fake_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        note(path)
        return real_os_open(path, *args, **kwargs)

    def fake_path_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        note(self)
        return real_path_open(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", fake_open)
        patch.setattr(io, "open", fake_open)
        patch.setattr(os, "open", fake_os_open)
        patch.setattr(Path, "open", fake_path_open)
        yield opened


_IN_ACCESS = 0x001
_IN_OPEN = 0x020
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class _Inotify:
    """Files opened or read (by anyone, Python or C++) in some directories, via Linux inotify."""

    def __init__(self, directories: list[Path]) -> None:
        self.fd = -1
        self.dirs: dict[int, Path] = {}
        name = ctypes.util.find_library("c")
        if not hasattr(os, "O_CLOEXEC") or name is None:
            return
        libc = ctypes.CDLL(name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            return
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            return
        self.fd = fd
        for directory in directories:
            wd = int(libc.inotify_add_watch(fd, os.fsencode(directory), _IN_OPEN | _IN_ACCESS))
            assert wd >= 0, f"inotify_add_watch({directory}) failed: errno {ctypes.get_errno()}"
            self.dirs[wd] = directory

    @property
    def available(self) -> bool:
        return self.fd >= 0

    def events(self) -> list[tuple[Path, int]]:
        """Drain the queue: (file path, event mask) for files (not directories)."""
        found: list[tuple[Path, int]] = []
        if self.fd < 0:
            return found
        while True:
            try:
                buffer = os.read(self.fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return found
                raise
            offset = 0
            while offset < len(buffer):
                wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
                offset += _EVENT.size
                raw = buffer[offset : offset + length].rstrip(b"\0")
                offset += length
                if raw and not mask & _IN_ISDIR:
                    found.append((self.dirs[wd] / os.fsdecode(raw), mask))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _plant(tmp_path: Path, data: bytes) -> tuple[Path, list[Path]]:
    """Write the model to ``tmp/model/model.onnx`` next to real files at the referenced places."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model_path = model_dir / "model.onnx"
    model_path.write_bytes(data)
    secret = tmp_path / "secret.bin"  # = model/../secret.bin
    secret.write_bytes(SECRET_BYTES)
    weights = model_dir / "weights.bin"
    weights.write_bytes(WEIGHTS_BYTES)
    return model_path, [secret, weights]


def _load_path_watched(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model_path: Path | str,
    call: Callable[[], object],
) -> tuple[object, list[str], list[tuple[Path, int]] | None]:
    """Run ``call`` (a load); return its result or exception, Python opens and inotify events."""
    watch = _Inotify([tmp_path, tmp_path / "model"])
    outcome: object
    try:
        with _memory_guard(), _record_opens(monkeypatch) as opened:
            try:
                outcome = call()
            except Exception as exc:
                outcome = exc
        events = watch.events() if watch.available else None
    finally:
        watch.close()
    return outcome, opened, events


def _assert_only_model_touched(
    model_path: Path, opened: list[str], events: list[tuple[Path, int]] | None
) -> None:
    allowed = _real(str(model_path))
    assert set(opened) <= {allowed}, f"opened other files: {sorted(set(opened) - {allowed})}"
    if events is not None:
        others = sorted({str(path) for path, _mask in events if _real(str(path)) != allowed})
        assert not others, f"files opened or read behind Python's back: {others}"


def _assert_static_io(loaded: LoadedModel, input_shape: list[int], output_shape: list[int]) -> None:
    graph = loaded.model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    shapes = {}
    for info in [*inputs, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), info
        shapes[info.name] = [d.dim_value for d in dims]
    assert shapes[INPUT_NAME] == input_shape
    assert shapes[OUTPUT_NAME] == output_shape


# --- the corpus itself ---------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    ids = [case_id for case_id, _b, _e, _k in HOSTILE]
    assert len(ids) == len(set(ids)) >= 25
    for case_id, builder, expected, kwargs in HOSTILE:
        data = builder()
        assert isinstance(data, bytes), case_id
        assert data == builder(), f"{case_id}: builder is not deterministic"
        assert issubclass(expected, ModelRejected), case_id
        assert set(kwargs) <= {"limits", "shapes", "dims"}, case_id
    assert set(EXTERNAL_CASES) <= set(ids)


@pytest.mark.parametrize(
    "case_id",
    [
        "truncated_quarter",
        "truncated_half",
        "truncated_mid_initializer",
        "truncated_last_byte",
        "truncated_header",
        "garbage",
        "text_file",
        "pickle_payload",
        "pb_huge_length_graph",
        "pb_huge_length_raw_data",
    ],
)
def test_corpus_undecodable_cases_do_not_parse(case_id: str) -> None:
    """These cases are broken at the protobuf level (not merely semantically)."""
    builder = {cid: b for cid, b, _e, _k in HOSTILE}[case_id]
    with pytest.raises(DecodeError):
        onnx.ModelProto.FromString(builder())


def test_corpus_external_cases_really_refer_outside() -> None:
    by_id = {cid: b for cid, b, _e, _k in HOSTILE}
    for case_id, locations in EXTERNAL_CASES.items():
        model = onnx.ModelProto.FromString(by_id[case_id]())
        text = str(model)
        assert "EXTERNAL" in text or "external_data" in text, case_id
        for location in locations:
            assert location in text, (case_id, location)


def test_harness_sees_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchers used below do notice a file being opened and read (else they prove nothing)."""
    model_path, planted = _plant(tmp_path, b"")

    def sneaky() -> object:
        with open(planted[0], "rb") as handle:  # noqa: PTH123 (builtins.open is what is watched)
            handle.read()
        os.close(os.open(planted[1], os.O_RDONLY))
        return Path(model_path).read_bytes()

    _outcome, opened, events = _load_path_watched(monkeypatch, tmp_path, model_path, sneaky)
    assert {_real(str(p)) for p in planted} | {_real(str(model_path))} <= set(opened)
    if events is not None:
        touched = {path for path, _mask in events}
        assert set(planted) <= touched
        assert any(path == planted[0] and mask & _IN_ACCESS for path, mask in events)
    with pytest.raises(AssertionError):
        _assert_only_model_touched(model_path, opened, events)


# --- hostile models: refused with the right error ------------------------------------------


@pytest.mark.parametrize(("case_id", "builder", "expected", "kwargs"), HOSTILE_PARAMS)
def test_hostile_model_refused_from_bytes(
    case_id: str,
    builder: Builder,
    expected: type[ModelRejected],
    kwargs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = builder()
    accepted = accepted_errors(case_id, expected)
    with (
        _memory_guard() as peak,
        _record_opens(monkeypatch) as opened,
        pytest.raises(accepted) as info,
    ):
        load_model(data, **kwargs)
    _check_rejection(info.value, accepted)
    if accepted == (expected,):
        assert isinstance(info.value, expected)
    assert opened == [], f"loading from bytes opened files: {opened}"
    assert peak[0] < MAX_REFUSAL_MEMORY, (
        f"refusing {case_id} took {peak[0] / 2**20:.0f} MiB: the loader materialized data "
        "before checking the limits"
    )


@pytest.mark.parametrize(("case_id", "builder", "expected", "kwargs"), HOSTILE_PARAMS)
def test_hostile_model_refused_from_path(
    case_id: str,
    builder: Builder,
    expected: type[ModelRejected],
    kwargs: dict[str, Any],
    *,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model_path, planted = _plant(tmp_path, builder())
    outcome, opened, events = _load_path_watched(
        monkeypatch, tmp_path, model_path, lambda: load_model(model_path, **kwargs)
    )
    accepted = accepted_errors(case_id, expected)
    assert isinstance(outcome, BaseException), f"{case_id} loaded from a path"
    assert isinstance(outcome, accepted), f"{type(outcome).__name__}: {outcome}"
    _check_rejection(outcome, accepted)
    _assert_only_model_touched(model_path, opened, events)
    assert planted[0].read_bytes() == SECRET_BYTES
    assert planted[1].read_bytes() == WEIGHTS_BYTES


@pytest.mark.parametrize(("case_id", "builder", "expected", "kwargs"), EXTERNAL_PARAMS)
def test_external_data_never_read(
    case_id: str,
    builder: Builder,
    expected: type[ModelRejected],
    kwargs: dict[str, Any],
    *,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With real files where the model points, loading by ``str`` path refuses and reads none."""
    model_path, planted = _plant(tmp_path, builder())
    accepted = accepted_errors(case_id, expected)
    outcome, opened, events = _load_path_watched(
        monkeypatch, tmp_path, model_path, lambda: load_model(str(model_path), **kwargs)
    )
    assert isinstance(outcome, accepted), f"{type(outcome).__name__}: {outcome}"
    _check_rejection(outcome, accepted)
    _assert_only_model_touched(model_path, opened, events)
    assert _real(SECRET_ABS) not in opened and SECRET_ABS not in opened
    for path in planted:
        assert _real(str(path)) not in opened
    if events is not None:
        touched = {path for path, _mask in events}
        assert not touched & set(planted), f"external files touched: {touched & set(planted)}"
    assert planted[0].read_bytes() == SECRET_BYTES
    assert planted[1].read_bytes() == WEIGHTS_BYTES


# --- paths ---------------------------------------------------------------------------------


def test_nonexistent_path_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.onnx"
    with pytest.raises(ModelRejected) as info:
        load_model(missing)
    _check_rejection(info.value, (ModelRejected,))
    with pytest.raises(ModelRejected) as info:
        load_model(str(missing))
    _check_rejection(info.value, (ModelRejected,))


def test_directory_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected) as info:
        load_model(tmp_path)
    _check_rejection(info.value, (ModelRejected,))


def test_oversized_file_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (sparse) file one byte over the default limit is refused by size, without reading it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model_path = model_dir / "model.onnx"
    limit = LoadLimits().max_file_bytes
    with model_path.open("wb") as handle:
        handle.write(valid_model_bytes())
        handle.truncate(limit + 1)
    outcome, _opened, events = _load_path_watched(
        monkeypatch, tmp_path, model_path, lambda: load_model(model_path)
    )
    assert isinstance(outcome, ModelTooLarge), f"{type(outcome).__name__}: {outcome}"
    _check_rejection(outcome, (ModelTooLarge,))
    if events is not None:
        reads = [path for path, mask in events if mask & _IN_ACCESS]
        assert not reads, f"the oversized file was read before being refused: {reads}"


# --- valid models load ---------------------------------------------------------------------


def test_valid_static_model_from_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = valid_model_bytes()
    with _record_opens(monkeypatch) as opened:
        loaded = load_model(data)
    assert opened == []
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, onnx.ModelProto)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert list(loaded.input_names) == [INPUT_NAME]
    assert list(loaded.output_names) == [OUTPUT_NAME]
    _assert_static_io(loaded, [1, 3], [1, 4])


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_valid_static_model_from_path(
    as_str: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = valid_model_bytes()
    model_path, _planted = _plant(tmp_path, data)
    source: Path | str = str(model_path) if as_str else model_path
    outcome, opened, events = _load_path_watched(
        monkeypatch, tmp_path, model_path, lambda: load_model(source)
    )
    assert isinstance(outcome, LoadedModel), f"{type(outcome).__name__}: {outcome}"
    _assert_only_model_touched(model_path, opened, events)
    assert outcome.sha256 == hashlib.sha256(data).hexdigest()
    assert list(outcome.input_names) == [INPUT_NAME]
    assert list(outcome.output_names) == [OUTPUT_NAME]
    _assert_static_io(outcome, [1, 3], [1, 4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dims": {"batch_size": 1}},
        {"shapes": {INPUT_NAME: [1, 3]}},
        {"dims": {"batch_size": 1}, "shapes": {INPUT_NAME: [1, 3]}},
    ],
    ids=["dims", "shapes", "both"],
)
def test_dynamic_model_loads_when_pinned(kwargs: dict[str, Any]) -> None:
    data = dynamic_model_bytes()
    loaded = load_model(data, **kwargs)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    _assert_static_io(loaded, [1, 3], [1, 4])


def test_dynamic_model_pinned_to_batch_two() -> None:
    loaded = load_model(dynamic_model_bytes(), dims={"batch_size": 2})
    _assert_static_io(loaded, [2, 3], [2, 4])


#: Valid neighbours of hostile cases: the same bytes load once the one defect is absent
#: (limits raised, pins given), which shows each hostile case has the intended defect only.
CONTROLS: list[tuple[str, Builder, dict[str, Any]]] = [
    ("five_nodes_default_limits", five_nodes, {}),
    ("many_nodes_raised_limit", many_nodes, {"limits": LoadLimits(max_nodes=5000)}),
    ("constant_weight", constant_weight_model, {}),
    ("broadcast_raised_limit", intermediate_broadcast,
     {"limits": LoadLimits(max_tensor_elements=2**26)}),
    ("two_symbolic_dims_pinned", second_symbolic_dim, {"dims": {"batch_size": 1, "features": 3}}),
    ("opset_9", lambda: valid_model_proto(opset=9).SerializeToString(), {}),
    ("opset_18", lambda: valid_model_proto(opset=18).SerializeToString(), {}),
    ("file_limit_exact", valid_model_bytes,
     {"limits": LoadLimits(max_file_bytes=len(valid_model_bytes()))}),
    ("initializer_bytes_exact", valid_model_bytes,
     {"limits": LoadLimits(max_initializer_bytes=64)}),
    ("tensor_elements_exact", valid_model_bytes, {"limits": LoadLimits(max_tensor_elements=12)}),
    ("weight_below_circuit_bound", weight_below_circuit_bound, {}),
    ("shapeless_input_pinned", shapeless_input, {"shapes": {INPUT_NAME: [1, 3]}}),
]  # fmt: skip


@pytest.mark.parametrize(("builder", "kwargs"), [pytest.param(b, k, id=i) for i, b, k in CONTROLS])
def test_control_models_load(builder: Builder, kwargs: dict[str, Any]) -> None:
    data = builder()
    loaded = load_model(data, **kwargs)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()


def test_shared_models_present() -> None:
    assert len(SHARED_MODELS) >= 7, f"shared models not found under {_SHARED} (REFUTE_SHARED)"


def test_shared_models_loading_do_not_regress() -> None:
    loading = sum(load_shared(path) is not None for path in SHARED_MODELS)
    assert loading >= SHARED_MODELS_LOADING, f"only {loading} shared models load"


@pytest.mark.parametrize("path", SHARED_MODELS, ids=[p.parent.name for p in SHARED_MODELS])
def test_shared_models_load(path: Path) -> None:
    """Every shared model loads from bytes, a path and a string alike, or is refused with a
    one-line reason (never a crash)."""
    data = path.read_bytes()
    if load_shared(path) is None:
        return  # refused cleanly (checked by load_shared)
    declared = onnx.load_model_from_string(data).graph
    weights = {t.name for t in declared.initializer}
    for source in (data, path, str(path)):
        loaded = load_model(source, dims={"batch_size": 1})
        assert loaded.sha256 == hashlib.sha256(data).hexdigest()
        assert list(loaded.input_names) == [i.name for i in declared.input
                                            if i.name not in weights]
        assert list(loaded.output_names) == [o.name for o in declared.output]
        graph = loaded.model.graph
        initializers = {t.name for t in graph.initializer}
        for info in [*graph.input, *graph.output]:
            if info.name in initializers:
                continue
            dims = info.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)  # static
    symbolic = {i.name for i in declared.input
                if i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].dim_value}
    for spec in loaded.input_specs:
        if spec.name in symbolic:  # a symbolic batch is pinned to 1
            assert spec.shape[0] == 1


# --- no input makes the loader fail in an untyped way --------------------------------------


def _load_or_reject(data: bytes, **kwargs: Any) -> None:
    """Loading either succeeds or raises a well-formed ModelRejected; anything else escapes."""
    try:
        with _memory_guard():
            load_model(data, **kwargs)
    except ModelRejected as err:
        _check_rejection(err, (ModelRejected,))


_VALID = valid_model_bytes()
_DYNAMIC = dynamic_model_bytes()
_SMALL_LIMITS = LoadLimits(max_tensor_elements=4096, max_initializer_bytes=2**20)


@pytest.mark.parametrize("name", [b"gemm", b"output", b"hostile", b"refute-hostile-corpus"])
def test_a_string_that_is_not_utf8_is_refused_by_name(name: bytes) -> None:
    # ONNX is proto2: the parser hands an invalid UTF-8 string back as bytes, and the checker
    # then raised a bare UnicodeDecodeError (found by the corruption fuzzer below in CI).
    corrupted = _VALID.replace(name, b"\x80" + name[1:], 1)
    assert corrupted != _VALID
    with pytest.raises(ModelRejected, match="is not UTF-8 text") as info:
        load_model(corrupted, dims={"batch_size": 1}, limits=_SMALL_LIMITS)
    _check_rejection(info.value, (ModelRejected,))


def test_every_proper_prefix_of_a_valid_model_is_rejected() -> None:
    for length in range(len(_VALID)):
        with pytest.raises(ModelRejected) as info:
            load_model(_VALID[:length])
        _check_rejection(info.value, (ModelRejected,))


@pytest.mark.parametrize("source", [_VALID, _DYNAMIC], ids=["static", "dynamic"])
def test_every_single_byte_flip_is_loaded_or_rejected(source: bytes) -> None:
    for index in range(len(source)):
        for mask in (0x01, 0x80, 0xFF):
            corrupted = bytearray(source)
            corrupted[index] ^= mask
            _load_or_reject(bytes(corrupted), dims={"batch_size": 1}, limits=_SMALL_LIMITS)


_FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@_FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_loaded_or_rejected(data: bytes) -> None:
    _load_or_reject(data)


@_FUZZ
@given(st.data())
def test_random_corruptions_are_loaded_or_rejected(data: st.DataObject) -> None:
    source = data.draw(st.sampled_from([_VALID, _DYNAMIC]))
    corrupted = bytearray(source)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    if data.draw(st.booleans()):
        corrupted = corrupted[:cut]
    _load_or_reject(bytes(corrupted), dims={"batch_size": 1}, limits=_SMALL_LIMITS)


@_FUZZ
@given(st.integers(0, len(_VALID)), st.binary(min_size=1, max_size=64))
def test_random_insertions_are_loaded_or_rejected(position: int, junk: bytes) -> None:
    _load_or_reject(_VALID[:position] + junk + _VALID[position:], limits=_SMALL_LIMITS)


# --- values, folding bombs, one-line refusals (issue 9: findings 7 and 9) ------------------


@pytest.mark.parametrize("case_id", sorted(VALUE_CASES))
def test_non_finite_or_unrepresentable_values_name_the_tensor(case_id: str) -> None:
    builder = {cid: b for cid, b, _e, _k in HOSTILE}[case_id]
    with pytest.raises(ModelRejected) as info:
        load_model(builder())
    _check_rejection(info.value, (ModelRejected,))
    assert VALUE_CASES[case_id] in info.value.reason, info.value.reason


def test_value_bound_is_the_circuit_bound() -> None:
    """The default bound is where round(v · 2^MAX_SCALE) stops fitting below MAX_QUANTIZED."""
    from refute.quantize import MAX_QUANTIZED, MAX_SCALE

    assert LoadLimits().max_abs_value * 2**MAX_SCALE == MAX_QUANTIZED
    loaded = load_model(weight_below_circuit_bound())
    weights = {t.name: t for t in loaded.model.graph.initializer}
    assert float(abs(onnx.numpy_helper.to_array(weights["W"])).max()) > 4e9


#: Bombs measured in a fresh process: time of the load and the process's peak RSS.
BOMBS = ["constant_pads_chain", "fold_matmul_bomb", "fold_conv_bomb", "conv_compute_bomb",
         "intermediate_pad", "constant_fold_bomb_huge", "huge_weight"]
_MEASURE = """
import json, resource, sys
from refute.errors import RefuteError
from refute.loading import load_model
from tests.hostile_models import HOSTILE
builder, kwargs = next((b, k) for c, b, _e, k in HOSTILE if c == sys.argv[1])
data = builder()
def cpu():  # CPU seconds of this process: what the refusal costs, whatever else the machine runs
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
started = cpu()
try:
    load_model(data, **kwargs)
    error = None
except RefuteError as exc:
    error = type(exc).__name__
seconds = cpu() - started
# VmHWM is this process image's own peak (ru_maxrss keeps the forking parent's across exec).
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "seconds": seconds, "peak": peak, "size": len(data)}))
"""
#: Peak RSS of a process that imported the loader and refused a bomb (the imports take ~80 MB).
MAX_BOMB_RSS = 300 * 2**20


@pytest.mark.parametrize("case_id", BOMBS)
def test_bombs_refused_fast_with_bounded_memory(case_id: str) -> None:
    """Before the fix, constant_pads_chain (365 bytes) took 2.1 GB, fold_conv_bomb 5.3 GB and
    8 s, fold_matmul_bomb 0.7 GB and 4 s; each is now refused from the inferred shapes alone."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _MEASURE, case_id], cwd=root, timeout=120,
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] is not None, f"{case_id} loaded"
    assert report["seconds"] < 2.0, report
    assert report["peak"] < MAX_BOMB_RSS, f"{case_id}: peak RSS {report['peak'] / 2**20:.0f} MiB"
    assert report["size"] < 2048


def test_cli_pins_a_shapeless_input_and_refuses_in_one_line(tmp_path: Path) -> None:
    """``--shape`` on an input without a shape pins it (was: a ValueError traceback); a wrong
    pin and a broken model are one-line errors."""
    from typer.testing import CliRunner

    from verifier.main import app

    model = tmp_path / "shapeless.onnx"
    model.write_bytes(shapeless_input())
    broken = tmp_path / "no_outputs.onnx"
    broken.write_bytes(node_without_outputs())
    runner = CliRunner()
    good = runner.invoke(app, ["segment", str(model), "--shape", f"{INPUT_NAME}=1,3", "--json"])
    assert good.exit_code == 0, good.output
    assert '"segments"' in good.output or '"cuts"' in good.output
    for args in (["segment", str(model), "--shape", f"{INPUT_NAME}=1,5"],
                 ["segment", str(model)],
                 ["segment", str(broken)]):
        failed = runner.invoke(app, args)
        assert failed.exit_code == 2, (args, failed.output)
        assert failed.exception is None or isinstance(failed.exception, SystemExit)
        text = failed.output
        assert "Traceback" not in text
        lines = [line for line in text.splitlines() if line.strip() and "error" in line]
        assert len(lines) == 1, text


def test_segments_sharing_a_weight_are_bounded_before_they_are_built() -> None:
    """A 16 MiB weight used by 128 MatMuls would be copied into 128 segments (2 GiB); the
    segmentation refuses from the declared sizes, before building any segment."""
    import time

    from refute.segmentation import MAX_SEGMENT_WEIGHT_BYTES, segment_model

    loaded = load_model(shared_weight_chain())
    started = time.monotonic()
    with _memory_guard() as peak, pytest.raises(ModelTooLarge) as info:
        segment_model(loaded)
    _check_rejection(info.value, (ModelTooLarge,))
    assert str(MAX_SEGMENT_WEIGHT_BYTES) in info.value.reason
    assert time.monotonic() - started < 2.0
    assert peak[0] < MAX_REFUSAL_MEMORY
    few = segment_model(loaded, max_segments=4)  # the same weights in 4 segments: 64 MiB
    assert few.num_segments == 4


# --- ONNX Runtime and the folding evaluator never see a hostile model ----------------------

#: Hostile cases whose refusal is about what folding computes (a folded value that is not
#: finite): the reference evaluator runs on them, within the bounds checked before it.
_REFUSED_BY_FOLDED_VALUES = frozenset({"folded_inf"})


@pytest.mark.parametrize(("case_id", "builder", "expected", "kwargs"), HOSTILE_PARAMS)
def test_hostile_models_never_reach_onnxruntime_or_the_folder(
    case_id: str,
    builder: Builder,
    expected: type[ModelRejected],
    kwargs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading runs no ONNX Runtime session at all, and the constant-folding evaluator only
    on models whose every limit held (the fold bombs are refused from their inferred sizes)."""
    import onnx.reference
    import onnxruntime

    evaluated: list[str] = []

    def no_session(*args: Any, **kw: Any) -> None:
        raise AssertionError(f"ONNX Runtime saw hostile model {case_id}")

    class Recording(onnx.reference.ReferenceEvaluator):
        def __init__(self, *args: Any, **kw: Any) -> None:
            evaluated.append(case_id)
            super().__init__(*args, **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", Recording)
    with pytest.raises(ModelRejected):
        load_model(builder(), **kwargs)
    if case_id not in _REFUSED_BY_FOLDED_VALUES:
        assert not evaluated, f"the folding evaluator ran on hostile model {case_id}"
