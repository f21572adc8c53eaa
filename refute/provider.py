"""The provider's side: prepare a model once, then trace executions and commit to them.

::

    prepared = prepare_model("model.onnx", dims={"batch_size": 1})
    trace = run_trace(prepared, {"input": x})
    trace.write("result.rtrace")          # bundle for upload
    trace.commitment.root                 # what the result carries

Every step reports progress through an optional callback ``progress(stage, done, total)`` so
front ends (the CLI, later the API) can show where long work stands.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from refute import safejson
from refute.errors import InputError, ModelRejected
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, LoadLimits, load_model
from refute.manifest import Manifest
from refute.pinning import FROM_DEFAULT, FROM_INPUT
from refute.provider_session import StateSession
from refute.quantize import DEFAULT_SCALE
from refute.segmentation import (
    Segmentation,
    check_reproduces,
    run_segment,
    run_segments,
    segment_model,
)
from refute.settings import get_settings
from refute.trace import Trace

#: ``progress(stage, done, total)``: called as long work advances.
ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    del stage, done, total


@dataclass(frozen=True)
class PreparedModel:
    """A model loaded, segmented, checked and described by its manifest."""

    loaded: LoadedModel
    segmentation: Segmentation
    manifest: Manifest

    @functools.cached_property
    def state_session(self) -> StateSession:
        """The optimized whole-model session a provider executes with (built on first use)."""
        return StateSession(self.segmentation)


def prepare_model(
    source: bytes | str | os.PathLike[str],
    *,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_sizes: Sequence[int] | None = None,
    cuts: Sequence[int] | None = None,
    max_segments: int | None = None,
    scale: int = DEFAULT_SCALE,
    limits: LoadLimits | None = None,
    check_inputs: Sequence[Mapping[str, np.ndarray]] = (),
    executor: DeterministicExecutor | None = None,
    progress: ProgressFn = _no_progress,
) -> PreparedModel:
    """Load and segment a model, check the segments reproduce it bit for bit, build its manifest.

    ``limits`` default to the settings' (:func:`configured_limits`). Symbolic input dimensions
    are pinned as :func:`~refute.loading.load_model` does (``dims`` and ``shapes`` first, then
    ``input_sizes`` from an input file, then ``batch_size`` = 1); the manifest records every pin,
    so the model loads the same way from it. The reproduction check runs on ``check_inputs``
    plus one seeded random input, so it always runs at least once.
    """
    progress("load", 0, 1)
    loaded = load_model(source, limits=limits or configured_limits(), shapes=shapes, dims=dims,
                        input_sizes=input_sizes)
    progress("load", 1, 1)
    progress("segment", 0, 1)
    segmentation = segment_model(loaded, cuts=cuts, max_segments=max_segments)
    progress("segment", 1, 1)
    executor = executor or DeterministicExecutor()
    probes = [*check_inputs, random_inputs(loaded, seed=int(loaded.sha256[:8], 16))]
    for n, probe in enumerate(probes):
        progress("check", n, len(probes))
        check_reproduces(executor, segmentation, validate_inputs(loaded, probe))
    progress("check", len(probes), len(probes))
    pins: dict[str, Any] = {}
    if dims:
        pins["dims"] = dict(sorted(dims.items()))
    inferred = {p.input for p in loaded.pins if p.source in (FROM_INPUT, FROM_DEFAULT)}
    whole = {**{k: list(v) for k, v in (shapes or {}).items()},
             **{name: list(loaded.tensors[name].shape) for name in inferred}}
    if whole:
        pins["shapes"] = dict(sorted(whole.items()))
    manifest = Manifest.build(segmentation, scale=scale, pins=pins)
    return PreparedModel(loaded, segmentation, manifest)



def configured_limits() -> LoadLimits:
    """The load limits the settings set (``REFUTE_MAX_MODEL_BYTES``,
    ``REFUTE_MAX_INITIALIZER_BYTES``, ``REFUTE_MAX_MODEL_WORK``), the others at their defaults."""
    settings = get_settings()
    return LoadLimits(max_file_bytes=settings.max_model_bytes,
                      max_initializer_bytes=settings.max_initializer_bytes,
                      max_model_work=settings.max_model_work)


def prepare_for_manifest(source: bytes | str | os.PathLike[str],
                         manifest: Manifest) -> PreparedModel:
    """Prepare ``source`` exactly as ``manifest`` describes it (pins, cuts, scale), check the
    segmentation against it, and carry the manifest."""
    pins = manifest.pins
    prepared = prepare_model(source, dims=pins.get("dims"), shapes=pins.get("shapes"),
                             cuts=manifest.cuts, scale=manifest.scale)
    manifest.check_segmentation(prepared.segmentation)
    return dataclasses.replace(prepared, manifest=manifest)

def run_trace(
    prepared: PreparedModel,
    inputs: Mapping[str, np.ndarray],
    *,
    executor: DeterministicExecutor | None = None,
    deterministic: bool = False,
    threads: int | None = None,
    spool: Path | None = None,
    progress: ProgressFn = _no_progress,
) -> Trace:
    """Execute the model on ``inputs`` and commit to every state.

    As a provider does: the whole model once, in the optimized session
    (:attr:`PreparedModel.state_session`: ONNX Runtime's graph optimizations, every core); its
    states differ from a checker's deterministic ones by float rounding, which τ absorbs and
    honest challengers allow for (:func:`refute.verdict.agrees`). With ``deterministic`` (or
    an ``executor``), segment by segment under the deterministic executor instead: the states a
    checker re-executing the model gets bit for bit.

    With ``spool`` (the optimized run only), the states are written by ONNX Runtime straight
    into that file's mapping and the trace's arrays are views of it
    (:meth:`~refute.provider_session.StateSession.run`): a trace larger than memory stays in
    the page cache; keep the file until the trace is written or uploaded.
    """
    if spool is not None and (deterministic or executor is not None):
        raise InputError("a spool file is for the optimized provider run, not the "
                         "deterministic one")
    feeds = validate_inputs(prepared.loaded, inputs)
    segments = prepared.segmentation.segments
    if not deterministic and executor is None:
        progress("execute", 0, 1)
        states = prepared.state_session.run(feeds, spool=spool)
        progress("execute", 1, 1)
    else:
        executor = executor or DeterministicExecutor()
        states = [[feeds[name] for name in prepared.loaded.input_names]]
        for i, segment in enumerate(segments):
            progress("execute", i, len(segments))
            states.append(run_segment(executor, segment, states[-1]))
        progress("execute", len(segments), len(segments))
    progress("commit", 0, 1)
    trace = Trace.from_states(prepared.manifest, states, threads=threads)
    progress("commit", 1, 1)
    return trace


def validate_inputs(loaded: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check inputs name exactly the model's inputs with the right shapes; return float32 copies.

    Float64 inputs are accepted and converted; integer or non-finite inputs are refused, and so
    are values that are not whole numbers for an input the model declares integral (its
    :attr:`~refute.loading.LoadedModel.integral_inputs`).
    """
    names = set(loaded.input_names)
    if set(inputs) != names:
        raise InputError(
            f"inputs must be exactly {sorted(names)}, got {sorted(inputs)}"
        )
    out: dict[str, np.ndarray] = {}
    for spec in loaded.input_specs:
        array = np.asarray(inputs[spec.name])
        if array.dtype.kind != "f":
            raise InputError(f"input {spec.name!r} must be floating point, got {array.dtype}")
        if tuple(array.shape) != spec.shape:
            raise InputError(
                f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(array.shape)}"
            )
        converted = np.asarray(array, dtype=np.float32, order="C")  # (keeps a scalar 0-d)
        if not np.isfinite(converted).all():
            raise InputError(f"input {spec.name!r} holds NaN or infinite values")
        declared = loaded.integral_inputs.get(spec.name)
        if declared is not None and declared != TensorProto.DOUBLE:
            _check_integral(spec.name, converted, declared)
        out[spec.name] = converted
    return out


#: Largest magnitude of a value given for an integral input: float32 holds every integer up to
#: 2^24 exactly.
MAX_INTEGRAL_INPUT = 2**24


def _check_integral(name: str, values: np.ndarray, declared: int) -> None:
    if not np.array_equal(values, np.round(values)):
        raise InputError(f"input {name!r} is declared {TensorProto.DataType.Name(declared)}: "
                         "its values must be whole numbers")
    if values.size and float(np.max(np.abs(values))) > MAX_INTEGRAL_INPUT:
        raise InputError(f"input {name!r} holds an integer beyond ±2^24, which float32 states "
                         "cannot carry exactly")
    if declared == TensorProto.BOOL and not np.isin(values, (0.0, 1.0)).all():
        raise InputError(f"input {name!r} is declared BOOL: its values must be 0 or 1")


def random_inputs(loaded: LoadedModel, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input: uniform(-1, 1) floats, and for an integral input
    integers in [0, 4) (0 or 1 for a boolean one)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in loaded.input_specs:
        declared = loaded.integral_inputs.get(spec.name)
        if declared is None or declared == TensorProto.DOUBLE:
            out[spec.name] = rng.uniform(-1.0, 1.0, size=spec.shape).astype(np.float32)
        else:
            high = 2 if declared == TensorProto.BOOL else 4
            out[spec.name] = rng.integers(0, high, size=spec.shape).astype(np.float32)
    return out


def calibration_inputs(
    prepared: PreparedModel,
    sample: Mapping[str, np.ndarray] | None,
    count: int,
    *,
    executor: DeterministicExecutor | None = None,
) -> list[dict[str, np.ndarray]]:
    """The inputs a model is calibrated on: the ``sample`` (if any) and seeded ones.

    Without a sample: ``count`` :func:`random_inputs`. With one: the sample, ``count`` copies of
    it with every float value scaled by a factor in [0.9, 1.1] (integral inputs kept), and
    ``count`` :func:`random_inputs` as well, kept where the model stays finite on them: the
    sample says where the model's domain is (positive inputs of a ``Pow``, say), and the
    random ones keep τ honest outside it (a circuit that pads a MaxPool with 0 where ONNX pads
    with -inf differs on negative inputs, and must show it at registration, not in a dispute).

    Every state of the sample, its copies and (without a sample) the random inputs must be
    finite: a model that overflows float32 on them is refused, since its range and tolerances
    would be meaningless.
    """
    loaded = prepared.loaded
    executor = executor or DeterministicExecutor()

    def finite(feeds: Mapping[str, np.ndarray]) -> int | None:
        """The first state holding NaN or an infinity, or None."""
        for k, state in enumerate(run_segments(executor, prepared.segmentation, feeds)):
            if not all(bool(np.isfinite(t).all()) for t in state):
                return k
        return None

    required = [validate_inputs(loaded, sample)] if sample is not None else []
    optional: list[dict[str, np.ndarray]] = []
    for seed in range(count):
        (optional if sample is not None else required).append(random_inputs(loaded, seed=seed))
        if sample is None:
            continue
        rng = np.random.default_rng(seed)
        required.append({
            name: value if name in loaded.integral_inputs
            else (value * rng.uniform(0.9, 1.1, size=value.shape)).astype(np.float32)
            for name, value in required[0].items()
        })
    for n, feeds in enumerate(required):
        bad = finite(feeds)
        if bad is not None:
            raise ModelRejected(f"state {bad} is NaN or infinite on calibration input {n}: "
                                "the model overflows float32 on these inputs")
    return required + [feeds for feeds in optional if finite(feeds) is None]


def input_sizes(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[int]:
    """Element counts of each tensor of an EZKL ``input.json`` (to pin symbolic dimensions)."""
    doc = _input_doc(source)
    data = doc.get("input_data") if isinstance(doc, Mapping) else None
    if not isinstance(data, list):
        raise InputError("input JSON needs 'input_data': one list per model input")
    try:
        return [int(np.asarray(values, dtype=np.float64).size) for values in data]
    except (TypeError, ValueError) as exc:
        raise InputError("input JSON 'input_data' holds non-numeric or ragged values") from exc


def _input_doc(source: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return source
    try:
        return safejson.loads(Path(source).read_bytes(), what=f"input file {source}")
    except OSError as exc:
        raise InputError(f"cannot read input file {source}: {exc.strerror}") from exc


def read_inputs_json(source: str | os.PathLike[str] | Mapping[str, Any],
                     loaded: LoadedModel) -> dict[str, np.ndarray]:
    """Read inputs in EZKL's ``input.json`` form: ``{"input_data": [[...], ...]}``.

    ``input_data`` holds one flat list per model input, in graph order; each is reshaped to the
    input's (pinned) shape.
    """
    doc = _input_doc(source)
    data = doc.get("input_data") if isinstance(doc, Mapping) else None
    if not isinstance(data, list) or len(data) != len(loaded.input_names):
        raise InputError(
            f"input JSON needs 'input_data' with {len(loaded.input_names)} list(s), one per input"
        )
    out: dict[str, np.ndarray] = {}
    for spec, values in zip(loaded.input_specs, data, strict=True):
        try:
            flat = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError) as exc:
            raise InputError(f"input {spec.name!r} holds non-numeric values") from exc
        if flat.size != spec.size:
            raise InputError(
                f"input {spec.name!r} needs {spec.size} values for shape {list(spec.shape)}, "
                f"got {flat.size}"
            )
        out[spec.name] = flat.reshape(spec.shape)
    return validate_inputs(loaded, out)
