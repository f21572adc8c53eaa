"""The model manifest a network publishes at registration (DESIGN.md "Registration" step 5).

Format ``refute.manifest/2``, JSON (documented in ``docs/FORMATS.md``). Its identity is the
sha256 of its canonical encoding (sorted keys, no whitespace). Fields the prover fills in later
(``tolerances``, ``range``, ``circuits``) are ``null`` until calibration has run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from refute.errors import BundleError, CommitmentError
from refute.executor import ORT_VERSION
from refute.leaves import LEAF_FORMAT
from refute.loading import TensorSpec
from refute.quantize import check_scale
from refute.segmentation import Segmentation

FORMAT = "refute.manifest/2"
#: The hash a proof exposes for each tensor it takes, named so a reader knows which Poseidon
#: instance it is (leaves are SHA-256: ``leaf``, :data:`refute.leaves.LEAF_FORMAT`).
POSEIDON_ID = "ezkl-poseidon-bn254-w2r1-rf8rp56"
#: The EZKL release circuits and hashes are tied to (read without loading the native library).
EZKL_VERSION: str = importlib.metadata.version("ezkl")


def canonical_json(data: Any) -> bytes:
    """Canonical JSON encoding: sorted keys, compact separators, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class SegmentEntry:
    """A segment as the manifest records it."""

    index: int
    start: int
    end: int
    sha256: str
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """Everything a verifier needs to know about a registered model."""

    model_sha256: str
    opset: int
    num_nodes: int
    cuts: tuple[int, ...]
    segments: tuple[SegmentEntry, ...]
    states: tuple[tuple[TensorSpec, ...], ...]
    scale: int
    scale_source: str = "default"
    pins: Mapping[str, Any] = field(default_factory=dict)
    tolerances: tuple[int, ...] | None = None
    range: float | None = None
    circuits: tuple[Mapping[str, Any], ...] | None = None
    ezkl_version: str = EZKL_VERSION
    onnxruntime_version: str = ORT_VERSION
    poseidon: str = POSEIDON_ID
    leaf: str = LEAF_FORMAT

    @classmethod
    def build(
        cls,
        segmentation: Segmentation,
        *,
        scale: int,
        scale_source: str = "default",
        pins: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """The manifest of a segmented model at ``scale``."""
        return cls(
            model_sha256=segmentation.model.sha256,
            opset=segmentation.model.opset,
            num_nodes=len(segmentation.model.nodes),
            cuts=segmentation.cuts,
            segments=tuple(
                SegmentEntry(s.index, s.start, s.end, s.sha256, s.op_types)
                for s in segmentation.segments
            ),
            states=segmentation.states,
            scale=check_scale(scale),
            scale_source=scale_source,
            pins=dict(pins or {}),
        )

    @property
    def num_segments(self) -> int:
        """N."""
        return len(self.segments)

    @property
    def sha256(self) -> str:
        """The manifest's identity: sha256 of its canonical JSON."""
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    def check_segmentation(self, segmentation: Segmentation) -> None:
        """Raise :class:`BundleError` unless ``segmentation`` is the one this manifest records."""
        if segmentation.model.sha256 != self.model_sha256:
            raise BundleError("manifest is for another model (model sha256 differs)")
        if segmentation.cuts != self.cuts:
            raise BundleError("manifest cuts differ from the segmentation's")
        for entry, segment in zip(self.segments, segmentation.segments, strict=True):
            if entry.sha256 != segment.sha256:
                raise BundleError(f"segment {entry.index} bytes differ from the manifest's hash")

    def to_json(self) -> dict[str, Any]:
        """JSON form (``refute.manifest/2``)."""
        return {
            "format": FORMAT,
            "model": {
                "sha256": self.model_sha256,
                "opset": self.opset,
                "nodes": self.num_nodes,
                "pins": dict(self.pins),
            },
            "cuts": list(self.cuts),
            "segments": [
                {"index": s.index, "start": s.start, "end": s.end, "sha256": s.sha256,
                 "ops": list(s.ops)}
                for s in self.segments
            ],
            "states": [[t.to_json() for t in state] for state in self.states],
            "scale": self.scale,
            "scale_source": self.scale_source,
            "tolerances": list(self.tolerances) if self.tolerances is not None else None,
            "range": self.range,
            "circuits": [dict(c) for c in self.circuits] if self.circuits is not None else None,
            "versions": {"ezkl": self.ezkl_version, "onnxruntime": self.onnxruntime_version},
            "poseidon": self.poseidon,
            "leaf": self.leaf,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate the JSON form; raises :class:`BundleError` with the reason.

        Strict, because manifests also come from outside (a trace bundle's ``manifest.json``):
        every count, index and dimension must be a JSON integer (not a float, a boolean, NaN or
        an infinity), ``range`` a finite number, and no float anywhere in it may be NaN or
        infinite.
        """
        try:
            if not isinstance(data, Mapping):
                raise BundleError("malformed manifest: not a JSON object")
            _check_finite(data)
            if data["format"] == "refute.manifest/1":
                raise BundleError("a refute.manifest/1 manifest (Poseidon leaves) is no longer "
                                  f"accepted: register the model again to get a {FORMAT} one")
            if data["format"] != FORMAT:
                raise BundleError(f"unknown manifest format {str(data['format'])[:60]!r}")
            model = data["model"]
            cuts = tuple(_int(c, "cut") for c in data["cuts"])
            segments = tuple(
                SegmentEntry(_int(s["index"], "segment index"), _int(s["start"], "segment start"),
                             _int(s["end"], "segment end"), str(s["sha256"]),
                             tuple(str(o) for o in s["ops"]))
                for s in data["segments"]
            )
            states = tuple(tuple(_spec(t) for t in state) for state in data["states"])
            tolerances = data["tolerances"]
            circuits = data["circuits"]
            limit = data["range"]
            if limit is not None and (isinstance(limit, bool)
                                      or not isinstance(limit, int | float)):
                raise BundleError("malformed manifest: range must be a number or null")
            manifest = cls(
                model_sha256=str(model["sha256"]),
                opset=_int(model["opset"], "opset"),
                num_nodes=_int(model["nodes"], "node count"),
                cuts=cuts,
                segments=segments,
                states=states,
                scale=check_scale(data["scale"]),
                scale_source=str(data["scale_source"]),
                pins=dict(model["pins"]),
                tolerances=(tuple(_int(t, "tolerance") for t in tolerances)
                            if tolerances is not None else None),
                range=float(limit) if limit is not None else None,
                circuits=tuple(dict(c) for c in circuits) if circuits is not None else None,
                ezkl_version=str(data["versions"]["ezkl"]),
                onnxruntime_version=str(data["versions"]["onnxruntime"]),
                poseidon=str(data["poseidon"]),
                leaf=str(data["leaf"]),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                CommitmentError) as exc:
            raise BundleError(f"malformed manifest: {type(exc).__name__}: {exc}"[:300]) from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Internal consistency: cuts, segments and states agree with each other."""
        n = len(self.segments)
        if len(self.cuts) != n + 1 or len(self.states) != n + 1:
            raise BundleError("manifest cuts, segments and states disagree in number")
        if self.cuts[0] != 0 or self.cuts[-1] != self.num_nodes:
            raise BundleError("manifest cuts must run from 0 to the node count")
        for i, s in enumerate(self.segments, start=1):
            if (s.index, s.start, s.end) != (i, self.cuts[i - 1], self.cuts[i]):
                raise BundleError(f"manifest segment {i} does not match the cuts")
        if any(not state for state in self.states):
            raise BundleError("manifest has an empty state")
        if self.poseidon != POSEIDON_ID:
            raise BundleError(f"manifest uses an unknown hash {self.poseidon!r}")
        if self.leaf != LEAF_FORMAT:
            raise BundleError(f"manifest uses unknown leaves {self.leaf[:60]!r}, not "
                              f"{LEAF_FORMAT!r}")


#: Largest integer a manifest may hold (counts, cuts, dimensions, tolerances).
_MAX_INT = 2**63 - 1
#: Most containers walked when checking a manifest's floats (bounds the walk).
_MAX_WALK = 1_000_000


def _int(value: Any, what: str) -> int:
    """``value`` if it is a JSON integer within int64, else a :class:`BundleError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleError(f"malformed manifest: {what} must be an integer, got "
                          f"{str(value)[:40]!r}")
    if not -_MAX_INT <= value <= _MAX_INT:
        raise BundleError(f"malformed manifest: {what} is out of range")
    return value


def _check_finite(data: Any) -> None:
    """Refuse a NaN or an infinity anywhere in ``data`` (Python's JSON reader accepts
    ``NaN``/``Infinity``; a manifest never holds them)."""
    stack = [data]
    for _ in range(_MAX_WALK):
        if not stack:
            return
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise BundleError(f"malformed manifest: non-finite number {item!r}")
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    raise BundleError("malformed manifest: too many values")


def _spec(data: Mapping[str, Any]) -> TensorSpec:
    import numpy as np
    from onnx import TensorProto, helper

    dtype = np.dtype(str(data["dtype"]))
    shape = tuple(_int(d, "dimension") for d in data["shape"])
    if any(d <= 0 for d in shape):
        raise ValueError(f"tensor {data['name']!r} has a non-positive dimension")
    declared = None
    if "declared" in data:
        declared = helper.np_dtype_to_tensor_dtype(np.dtype(str(data["declared"])))
        if dtype != np.float32 or declared == TensorProto.FLOAT:
            raise ValueError(f"tensor {data['name']!r} declares {data['declared']} but is not "
                             "a float32 tensor carrying another type")
    return TensorSpec(str(data["name"]), helper.np_dtype_to_tensor_dtype(dtype), shape,
                      declared=declared)
