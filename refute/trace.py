"""Traces and the trace bundle format (``refute.trace/2``).

A :class:`Trace` is one execution cut into states: the N+1 states (float32 tensors in state
order) and the :class:`~refute.commitment.TraceCommitment` to their SHA-256 leaves.

On disk and over the wire a trace is a *bundle*: an uncompressed ZIP archive holding exactly

* ``manifest.json`` — the model manifest (:mod:`refute.manifest`);
* ``trace.json`` — format tag, manifest sha256, commitment, and per tensor its name, dtype,
  shape and member file;
* ``states/<k>/<j>.f32`` — tensor j of state k as raw little-endian float32, C order.

Reading a bundle trusts nothing in it: member sizes are checked against the declared shapes
before anything is read, every leaf and the root are recomputed from the states, and the
states must match the manifest's. Any mismatch is a :class:`~refute.errors.BundleError`
naming the state (and tensor) at fault. Cheap checks come first: a reader that knows which
manifest and which leaves to expect (the service does) passes them to :meth:`Trace.read`, and a
bundle made under another manifest, or claiming other leaves, is refused from its two small
JSON members before a single state is read or hashed. A ``refute.trace/1`` bundle (Poseidon
leaves) is refused with a message saying so.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refute.commitment import TraceCommitment
from refute.errors import BundleError, CommitmentError, RefuteError
from refute.leaves import state_leaf, tensor_bytes
from refute.manifest import Manifest, canonical_json
from refute.safejson import MAX_DEPTH, json_depth

FORMAT = "refute.trace/2"
_MANIFEST = "manifest.json"
_TRACE = "trace.json"
#: Largest JSON member accepted when reading a bundle.
_MAX_JSON_BYTES = 16 * 2**20


def _member(k: int, j: int) -> str:
    return f"states/{k}/{j}.f32"


@dataclass(frozen=True)
class Trace:
    """One committed execution of a manifest's model."""

    manifest: Manifest
    states: tuple[tuple[np.ndarray, ...], ...]
    commitment: TraceCommitment

    @classmethod
    def from_states(
        cls,
        manifest: Manifest,
        states: Sequence[Sequence[np.ndarray]],
        *,
        threads: int | None = None,
        check_range: bool = True,
    ) -> Trace:
        """Commit to ``states`` (which must match the manifest's state specs).

        Every value must be finite, and whole where the manifest declares a whole-number input
        (:func:`check_state`). With ``check_range`` (the default, used for every upload), a
        value outside the manifest's declared range R is refused too (DESIGN.md "Range rule"); a
        dispute that must reveal such a state turns it off and settles it with the range circuit
        instead.
        """
        frozen = tuple(tuple(np.asarray(t, dtype=np.float32, order="C") for t in s)
                       for s in states)  # np.ascontiguousarray would make a scalar [1]
        _check_states(manifest, frozen)
        for k, state in enumerate(frozen):
            check_state(manifest, k, state, check_range=check_range)
        commitment = TraceCommitment.of_states(manifest.scale, frozen, threads=threads)
        return cls(manifest, frozen, commitment)

    @property
    def outputs(self) -> tuple[np.ndarray, ...]:
        """State N: the model's outputs."""
        return self.states[-1]

    def to_json(self) -> dict[str, Any]:
        """The ``trace.json`` member."""
        return {
            "format": FORMAT,
            "manifest_sha256": self.manifest.sha256,
            "commitment": self.commitment.to_json(),
            "states": [
                [{**spec.to_json(), "file": _member(k, j)} for j, spec in enumerate(specs)]
                for k, specs in enumerate(self.manifest.states)
            ],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle atomically (temporary file, then rename) and return its path.
        Tensors are copied in pieces of 1 MiB, never whole (a spooled trace's states stay in
        the page cache)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(_MANIFEST, canonical_json(self.manifest.to_json()))
                archive.writestr(_TRACE, canonical_json(self.to_json()))
                for k, state in enumerate(self.states):
                    for j, tensor in enumerate(state):
                        _write_values(archive, _member(k, j), tensor)
            tmp.replace(target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BundleError(f"cannot write bundle {target}: {exc.strerror}") from exc
        return target

    @classmethod
    def read(
        cls,
        path: str | os.PathLike[str] | bytes,
        *,
        threads: int | None = None,
        rehash: bool = True,
        expect_manifest_sha256: str | None = None,
        expect_leaves: Sequence[bytes] | None = None,
    ) -> Trace:
        """Read and fully verify a bundle (a path, or its bytes); raises :class:`BundleError`
        on any inconsistency.

        ``expect_manifest_sha256`` and ``expect_leaves`` (the manifest and the commitment the
        caller holds) are compared with the bundle's own claims right after its two JSON
        members are parsed, before any state is read or hashed: a bundle made under another
        manifest, or for another commitment, costs milliseconds, not a full re-hash.

        ``rehash=False`` skips re-hashing the states and trusts the recorded leaves; every
        structural check still runs. Use it only for a bundle
        that was fully verified before and kept in content-addressed storage (the service's own
        blob store, whose key is the sha256 of the bytes).
        """
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        wanted = _Expected(expect_manifest_sha256,
                           None if expect_leaves is None else tuple(expect_leaves))
        try:
            with zipfile.ZipFile(source) as archive:
                return cls._read_archive(archive, threads, rehash, wanted)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"not a readable trace bundle: {exc}") from exc

    @classmethod
    def _read_archive(cls, archive: zipfile.ZipFile, threads: int | None, rehash: bool,
                      wanted: _Expected) -> Trace:
        infos = {info.filename: info for info in archive.infolist()}
        manifest = Manifest.from_json(_read_json(archive, infos, _MANIFEST))
        if wanted.manifest_sha256 is not None and manifest.sha256 != wanted.manifest_sha256:
            raise BundleError("the trace was made under another manifest than the model's")
        doc = _read_json(archive, infos, _TRACE)
        if isinstance(doc, dict) and doc.get("format") == "refute.trace/1":
            raise BundleError("this is a refute.trace/1 bundle, committed with Poseidon leaves "
                              f"that refute no longer accepts: trace the input again ({FORMAT})")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BundleError(f"trace.json is not a {FORMAT} document")
        if doc.get("manifest_sha256") != manifest.sha256:
            raise BundleError("trace.json names another manifest than the one in the bundle")
        claimed = TraceCommitment.from_json(doc.get("commitment"))
        if wanted.leaves is not None and tuple(claimed.leaves) != wanted.leaves:
            raise BundleError("the trace's leaves differ from the result's signed commitment")
        if claimed.scale != manifest.scale:
            raise BundleError("commitment scale differs from the manifest's")
        if claimed.num_states != len(manifest.states):
            raise BundleError("commitment has a different number of states than the manifest")
        expected = {_MANIFEST, _TRACE} | {
            _member(k, j) for k, s in enumerate(manifest.states) for j in range(len(s))
        }
        if set(infos) != expected:
            extra = sorted(set(infos) - expected)[:3]
            missing = sorted(expected - set(infos))[:3]
            raise BundleError(f"bundle members differ: unexpected {extra}, missing {missing}")
        states = []
        for k, specs in enumerate(manifest.states):
            tensors = []
            for j, spec in enumerate(specs):
                info = infos[_member(k, j)]
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != spec.size * 4:
                    raise BundleError(f"state {k} tensor {spec.name!r} has the wrong size")
                raw = archive.read(info)
                tensors.append(np.frombuffer(raw, dtype="<f4").reshape(spec.shape).copy())
            states.append(tuple(tensors))
        listed = doc.get("states")
        if not isinstance(listed, list) or len(listed) != len(manifest.states) or any(
                not isinstance(entries, list) or len(entries) != len(specs)
                for entries, specs in zip(listed, manifest.states, strict=False)):
            raise BundleError("trace.json must list every state with its tensors")
        if not rehash:
            return cls(manifest, tuple(states), claimed)
        try:
            trace = cls.from_states(manifest, states, threads=threads)
        except RefuteError as exc:
            raise BundleError(f"bundle states cannot be committed: {exc.reason}") from exc
        for k, (mine, theirs) in enumerate(
                zip(trace.commitment.leaves, claimed.leaves, strict=True)):
            if mine != theirs:
                raise BundleError(f"state {k} does not match its committed leaf")
        return trace


#: Largest piece of a tensor written at once.
_PIECE = 2**20


def _write_values(archive: zipfile.ZipFile, name: str, tensor: np.ndarray) -> None:
    values = tensor_bytes(tensor)
    with archive.open(name, "w", force_zip64=len(values) >= 2**31) as member:
        for start in range(0, len(values), _PIECE):
            member.write(values[start : start + _PIECE])


@dataclass(frozen=True)
class _Expected:
    """What the reader already holds and the bundle must claim (checked before any hashing)."""

    manifest_sha256: str | None
    leaves: tuple[bytes, ...] | None


def _check_states(manifest: Manifest, states: Sequence[Sequence[np.ndarray]]) -> None:
    if len(states) != len(manifest.states):
        raise BundleError(f"expected {len(manifest.states)} states, got {len(states)}")
    for k, (specs, tensors) in enumerate(zip(manifest.states, states, strict=True)):
        if len(specs) != len(tensors):
            raise BundleError(f"state {k} must hold {len(specs)} tensors, got {len(tensors)}")
        for spec, tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != spec.shape:
                raise BundleError(
                    f"state {k} tensor {spec.name!r} has shape {list(tensor.shape)}, "
                    f"expected {list(spec.shape)}"
                )


def check_state(manifest: Manifest, k: int, state: Sequence[np.ndarray], *,
                check_range: bool = True) -> None:
    """The rules every committed state keeps, checked on upload, disclosure and reveal: every
    value finite, whole where the manifest declares a whole-number input (a circuit takes it at
    scale 0), and with ``check_range`` within the declared range R (DESIGN.md "Range rule").
    Raises :class:`CommitmentError` naming the tensor."""
    bound = manifest.range if check_range else None
    for spec, tensor in zip(manifest.states[k], state, strict=True):
        if not tensor.size:
            continue
        top = max(float(tensor.max()), -float(tensor.min()))  # NaN and ±inf propagate
        if not math.isfinite(top):
            raise CommitmentError(f"state {k} tensor {spec.name!r} holds a non-finite value")
        if bound is not None and top > bound:
            raise CommitmentError(
                f"state {k} tensor {spec.name!r} breaks the declared range R={bound}")
        if spec.whole and not np.array_equal(tensor, np.round(tensor)):
            raise CommitmentError(f"state {k} tensor {spec.name!r} is a whole-number input "
                                  "but holds a value that is not a whole number")


def _read_json(
    archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], name: str
) -> Any:
    info = infos.get(name)
    if info is None:
        raise BundleError(f"bundle has no {name}")
    if info.file_size > _MAX_JSON_BYTES:
        raise BundleError(f"{name} is too large")
    raw = archive.read(info)
    depth = json_depth(raw, limit=MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise BundleError(f"{name} nests {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{name} is not valid JSON: {str(exc)[:200]}") from exc


def _no_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and infinities are not JSON, and never in a bundle."""
    raise ValueError(f"{name} is not a JSON number")


def leaf_of_state(manifest: Manifest, k: int, state: Sequence[np.ndarray]) -> bytes:
    """Recompute the leaf of state ``k`` (e.g. a state revealed during a dispute); the state
    must have the manifest's shapes for state ``k``."""
    specs = manifest.states[k]
    if len(state) != len(specs) or any(tuple(np.shape(t)) != spec.shape
                                       for t, spec in zip(state, specs, strict=False)):
        raise BundleError(f"state {k} does not have the manifest's tensors and shapes")
    return state_leaf([np.asarray(t, dtype=np.float32) for t in state])
