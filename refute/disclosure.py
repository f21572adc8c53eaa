"""Disclosing selected committed states (``refute.states/2``), not the whole trace.

A sampled provider that keeps its trace to itself is asked for exactly the states its
spot-check needs (DESIGN.md "Spot-checks"); it answers with a *disclosure bundle*: an
uncompressed ZIP archive holding

* ``states.json`` — ``{"format": "refute.states/2", "manifest_sha256": …, "states": [k, …]}``;
* ``states/<k>/<j>.f32`` — tensor j of state k, raw little-endian float32 in C order (the same
  member layout as a trace bundle).

Reading one trusts nothing in it: the manifest hash is compared first, member sizes are checked
against the manifest's shapes before any tensor is read, every state must keep the rules of
:func:`~refute.trace.check_state` (finite, whole where declared, within R), and each state must
reproduce its committed SHA-256 leaf. Any mismatch is a :class:`BundleError` naming
the state at fault.

A single state can also travel alone, as its *canonical bytes* (docs/FORMATS.md "Leaves": per
tensor a header and the float32 values, exactly the bytes its leaf hashes): a provider streams
them (:func:`state_pieces`, no copy of the tensors), and the service verifies each state as it
arrives (:func:`read_state`) and keeps it as a one-state bundle.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from refute.errors import BundleError, CommitmentError, RefuteError
from refute.leaves import canonical_pieces, leaf_of_bytes, tensor_header
from refute.manifest import Manifest, canonical_json
from refute.safejson import loads
from refute.trace import check_state, leaf_of_state

FORMAT = "refute.states/2"
_INDEX = "states.json"
_MAX_INDEX_BYTES = 2**20


def _member(k: int, j: int) -> str:
    return f"states/{k}/{j}.f32"


def write_states(manifest: Manifest, states: Mapping[int, Sequence[np.ndarray]]) -> bytes:
    """The disclosure bundle of ``states`` (state index → its tensors, in manifest order)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_INDEX, canonical_json({
            "format": FORMAT, "manifest_sha256": manifest.sha256, "states": sorted(states)}))
        for k in sorted(states):
            for j, tensor in enumerate(states[k]):
                archive.writestr(_member(k, j),
                                 np.ascontiguousarray(tensor, dtype="<f4").tobytes())
    return buffer.getvalue()


def read_states(manifest: Manifest, data: bytes,
                leaves: Sequence[str]) -> dict[int, tuple[np.ndarray, ...]]:
    """Verify a disclosure bundle against ``manifest`` and the committed ``leaves`` (``0x`` hex,
    one per state); return its states. Raises :class:`BundleError` on any inconsistency."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _read(archive, manifest, leaves)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BundleError(f"not a readable disclosure bundle: {exc}") from exc


def _read(archive: zipfile.ZipFile, manifest: Manifest,
          leaves: Sequence[str]) -> dict[int, tuple[np.ndarray, ...]]:
    infos = {info.filename: info for info in archive.infolist()}
    index = infos.get(_INDEX)
    if index is None or index.file_size > _MAX_INDEX_BYTES:
        raise BundleError(f"a disclosure bundle needs a {_INDEX} of at most {_MAX_INDEX_BYTES} "
                          "bytes")
    try:
        doc = loads(archive.read(index), what=_INDEX)
    except RefuteError as exc:
        raise BundleError(exc.reason) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{_INDEX} is not a {FORMAT} document")
    if doc.get("manifest_sha256") != manifest.sha256:
        raise BundleError("the states were disclosed under another manifest than the model's")
    listed = doc.get("states")
    n = len(manifest.states)
    if (not isinstance(listed, list) or not listed
            or not all(type(k) is int and 0 <= k < n for k in listed)
            or len(set(listed)) != len(listed)):
        raise BundleError(f"{_INDEX} must list distinct state indices in 0..{n - 1}")
    expected = {_INDEX} | {_member(k, j) for k in listed for j in range(len(manifest.states[k]))}
    if set(infos) != expected:
        extra = sorted(set(infos) - expected)[:3]
        missing = sorted(expected - set(infos))[:3]
        raise BundleError(f"disclosure members differ: unexpected {extra}, missing {missing}")
    for k in listed:  # every size before any tensor is read
        for j, spec in enumerate(manifest.states[k]):
            info = infos[_member(k, j)]
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != spec.size * 4:
                raise BundleError(f"state {k} tensor {spec.name!r} has the wrong size")
    states: dict[int, tuple[np.ndarray, ...]] = {}
    for k in sorted(listed):
        tensors = tuple(
            np.frombuffer(archive.read(infos[_member(k, j)]), dtype="<f4")
            .reshape(spec.shape).copy()
            for j, spec in enumerate(manifest.states[k]))
        try:
            check_state(manifest, k, tensors)
        except CommitmentError as exc:
            raise BundleError(exc.reason) from exc
        if "0x" + leaf_of_state(manifest, k, tensors).hex() != leaves[k]:
            raise BundleError(f"state {k} does not match its committed leaf")
        states[k] = tensors
    return states


#: Largest piece :func:`state_pieces` yields.
PIECE_BYTES = 2**20


def state_pieces(state: Sequence[np.ndarray]) -> Iterator[memoryview | bytes]:
    """The canonical bytes of ``state`` as pieces of at most :data:`PIECE_BYTES` (tensor
    headers, then views of the values: nothing is copied), for streaming one state."""
    for piece in canonical_pieces(state):
        for start in range(0, len(piece), PIECE_BYTES):
            yield piece[start : start + PIECE_BYTES]


def state_record_length(manifest: Manifest, k: int) -> int:
    """The length of state ``k``'s canonical bytes under ``manifest``."""
    _state_index(manifest, k)
    return sum(len(tensor_header(spec.shape)) + 4 * spec.size for spec in manifest.states[k])


def read_state(manifest: Manifest, k: int, data: bytes, leaf: str) -> tuple[np.ndarray, ...]:
    """State ``k`` from its canonical bytes, verified: the length and every tensor header
    must be the manifest's, the values must keep :func:`~refute.trace.check_state`, and the
    bytes must reproduce ``leaf`` (``0x`` hex). Raises :class:`BundleError` naming what is
    wrong."""
    expected = state_record_length(manifest, k)
    if len(data) != expected:
        raise BundleError(f"state {k} is {expected} bytes in its canonical layout, "
                          f"got {len(data)}")
    if "0x" + leaf_of_bytes(data).hex() != leaf:
        raise BundleError(f"state {k} does not match its committed leaf")
    tensors, offset = [], 0
    for spec in manifest.states[k]:
        header = tensor_header(spec.shape)
        if data[offset : offset + len(header)] != header:
            raise BundleError(f"state {k} tensor {spec.name!r}: the header is not that of a "
                              f"float32 tensor of shape {list(spec.shape)}")
        offset += len(header)
        tensors.append(np.frombuffer(data, dtype="<f4", count=spec.size, offset=offset)
                       .reshape(spec.shape).copy())
        offset += 4 * spec.size
    try:
        check_state(manifest, k, tensors)
    except CommitmentError as exc:
        raise BundleError(exc.reason) from exc
    return tuple(tensors)


def _state_index(manifest: Manifest, k: int) -> None:
    if not 0 <= k < len(manifest.states):
        raise BundleError(f"state {k} does not exist: the model has states 0..."
                          f"{len(manifest.states) - 1}")
