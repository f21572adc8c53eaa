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
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refute import safejson
from refute.errors import InputError
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, LoadLimits, load_model
from refute.manifest import Manifest
from refute.quantize import DEFAULT_SCALE
from refute.segmentation import Segmentation, check_reproduces, run_segment, segment_model
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


def prepare_model(
    source: bytes | str | os.PathLike[str],
    *,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    cuts: Sequence[int] | None = None,
    max_segments: int | None = None,
    scale: int = DEFAULT_SCALE,
    limits: LoadLimits | None = None,
    check_inputs: Sequence[Mapping[str, np.ndarray]] = (),
    executor: DeterministicExecutor | None = None,
    progress: ProgressFn = _no_progress,
) -> PreparedModel:
    """Load and segment a model, check the segments reproduce it bit for bit, build its manifest.

    The reproduction check runs on ``check_inputs`` plus one seeded random input, so it always
    runs at least once.
    """
    progress("load", 0, 1)
    loaded = load_model(source, limits=limits, shapes=shapes, dims=dims)
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
    if shapes:
        pins["shapes"] = {k: list(v) for k, v in sorted(shapes.items())}
    manifest = Manifest.build(segmentation, scale=scale, pins=pins)
    return PreparedModel(loaded, segmentation, manifest)



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
    workers: int | None = None,
    progress: ProgressFn = _no_progress,
) -> Trace:
    """Execute the model segment by segment on ``inputs`` and commit to every state."""
    executor = executor or DeterministicExecutor()
    feeds = validate_inputs(prepared.loaded, inputs)
    states = [[feeds[name] for name in prepared.loaded.input_names]]
    segments = prepared.segmentation.segments
    for i, segment in enumerate(segments):
        progress("execute", i, len(segments))
        states.append(run_segment(executor, segment, states[-1]))
    progress("execute", len(segments), len(segments))
    progress("commit", 0, 1)
    trace = Trace.from_states(prepared.manifest, states, workers=workers)
    progress("commit", 1, 1)
    return trace


def validate_inputs(loaded: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check inputs name exactly the model's inputs with the right shapes; return float32 copies.

    Float64 inputs are accepted and converted; integer or non-finite inputs are refused.
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
        converted = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(converted).all():
            raise InputError(f"input {spec.name!r} holds NaN or infinite values")
        out[spec.name] = converted
    return out


def random_inputs(loaded: LoadedModel, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded uniform(-1, 1) float32 inputs for every model input."""
    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.uniform(-1.0, 1.0, size=spec.shape).astype(np.float32)
        for spec in loaded.input_specs
    }


def read_inputs_json(source: str | os.PathLike[str] | Mapping[str, Any],
                     loaded: LoadedModel) -> dict[str, np.ndarray]:
    """Read inputs in EZKL's ``input.json`` form: ``{"input_data": [[...], ...]}``.

    ``input_data`` holds one flat list per model input, in graph order; each is reshaped to the
    input's (pinned) shape.
    """
    if isinstance(source, Mapping):
        doc: Any = source
    else:
        try:
            doc = safejson.loads(Path(source).read_bytes(), what=f"input file {source}")
        except OSError as exc:
            raise InputError(f"cannot read input file {source}: {exc.strerror}") from exc
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
