"""State leaves: a SHA-256 Merkle root over 4 KiB chunks of a state's canonical bytes
(DESIGN.md "leaf k"; the byte layout is written out in docs/FORMATS.md "Leaves").

The canonical bytes of a state are its tensors' records, in state order; a tensor's record is::

    b"<f4\\0"                      dtype tag: little-endian float32 (every state tensor is one)
    ndim                            uint32, little-endian
    dim_1 … dim_ndim                uint64 each, little-endian
    values                          float32 little-endian, C order

The bytes are cut into chunks of :data:`CHUNK` bytes (the last one may be shorter; there is
always at least one, since a record has a header). Chunk c hashes to ``sha256(0x00 ‖ chunk)``;
the hashes are paired level by level, ``sha256(0x01 ‖ left ‖ right)``, an odd last node going up
unchanged, down to one root; the leaf binds it to the byte length:
``sha256(0x02 ‖ uint64 LE length ‖ root)``.

Nothing here quantizes or computes Poseidon: a state is committed as the floats it holds, at the
speed of SHA-256: a native loop (OpenSSL's SHA-256, the GIL released) hashes runs of chunks,
several threads at once. Poseidon is computed only over what a proof hashes
(:mod:`refute.instances`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np

from refute.errors import CommitmentError

__all__ = ["CHUNK", "DTYPE_TAG", "LEAF_FORMAT", "chunk_hashes", "merkle_of_chunks", "state_bytes",
           "state_leaf", "state_leaves"]

#: The name of this leaf definition, recorded in manifests and commitments.
LEAF_FORMAT: Final[str] = "sha256-chunk4k/1"

#: Chunk size in bytes.
CHUNK: Final[int] = 4096
#: The dtype tag of every state tensor: little-endian float32.
DTYPE_TAG: Final[bytes] = b"<f4\x00"
_CHUNK_PREFIX: Final[bytes] = b"\x00"
_NODE_PREFIX: Final[bytes] = b"\x01"
_LEAF_PREFIX: Final[bytes] = b"\x02"
#: Below this many chunks a state is hashed on the calling thread.
_PARALLEL_CHUNKS: Final[int] = 512
#: Most chunks one native call hashes (1 MiB), so that threads share the work.
_RUN: Final[int] = 256
#: The native loop over chunks (``refute/_sha256chunks.c``: OpenSSL's SHA-256, GIL released),
#: built by ``scripts/bootstrap``; per-chunk calls from Python cost as much as the hashing.
_native: Any = importlib.import_module("refute._sha256chunks")


def tensor_header(shape: Sequence[int]) -> bytes:
    """The record header of a float32 tensor of ``shape``."""
    return DTYPE_TAG + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)


def _values(tensor: np.ndarray) -> memoryview:
    array = np.asarray(tensor)
    if array.dtype != np.float32:
        raise CommitmentError(f"a state tensor must be float32, got {array.dtype}")
    return np.ascontiguousarray(array, dtype="<f4").reshape(-1).view(np.uint8).data


def state_bytes(state: Sequence[np.ndarray]) -> bytes:
    """The canonical bytes of a state (for reference and tests; :func:`state_leaf` hashes the
    same bytes without building them in one piece)."""
    return b"".join(tensor_header(t.shape) + bytes(_values(t)) for t in state)


def _pieces(state: Sequence[np.ndarray]) -> list[memoryview]:
    if not state:
        raise CommitmentError("a state must hold at least one tensor")
    pieces: list[memoryview] = []
    for tensor in state:
        pieces.append(memoryview(tensor_header(np.shape(tensor))))
        pieces.append(_values(tensor))
    return pieces


def _runs(pieces: Sequence[memoryview]) -> list[memoryview | bytes]:
    """The canonical bytes cut for hashing: runs of whole CHUNK-byte chunks lying inside one
    piece (at most :data:`_RUN` chunks each, so that threads share the work), and a small copy
    for each chunk that straddles two pieces and for the last, shorter one. Every item holds
    ``ceil(len / CHUNK)`` chunks, in order."""
    items: list[memoryview | bytes] = []
    carry = bytearray()
    for piece in pieces:
        offset = 0
        if carry:
            offset = min(CHUNK - len(carry), len(piece))
            carry += piece[:offset]
            if len(carry) < CHUNK:
                continue
            items.append(bytes(carry))
            carry.clear()
        whole = offset + (len(piece) - offset) // CHUNK * CHUNK
        items.extend(piece[i : min(i + _RUN * CHUNK, whole)]
                     for i in range(offset, whole, _RUN * CHUNK))
        carry += piece[whole:]
    if carry or not items:
        items.append(bytes(carry))
    return items


def _count(item: memoryview | bytes) -> int:
    return max(1, -(-len(item) // CHUNK))


def _hash_run(item: memoryview | bytes) -> bytes:
    """``sha256(0x00 ‖ chunk)`` of every chunk of one item, concatenated (native, GIL
    released)."""
    size = CHUNK if len(item) >= CHUNK else len(item)
    digests: bytes = _native.digests(item, _CHUNK_PREFIX[0], size)
    return digests


def _hash_all(items: Sequence[memoryview | bytes], threads: int | None) -> list[bytes]:
    """Chunk hashes in order, spread over ``threads`` (default: every core) when there are
    enough chunks to pay for the threads."""
    threads = threads if threads is not None else (os.cpu_count() or 1)
    if threads <= 1 or sum(_count(item) for item in items) < _PARALLEL_CHUNKS:
        joined = b"".join(_hash_run(item) for item in items)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            joined = b"".join(pool.map(_hash_run, items))
    return [joined[i : i + 32] for i in range(0, len(joined), 32)]


def chunk_hashes(state: Sequence[np.ndarray], *, threads: int | None = None) -> list[bytes]:
    """``sha256(0x00 ‖ chunk)`` of every chunk of the state's canonical bytes, in order."""
    return _hash_all(_runs(_pieces(state)), threads)


def merkle_of_chunks(hashes: Sequence[bytes]) -> bytes:
    """The root over chunk hashes: ``sha256(0x01 ‖ left ‖ right)`` level by level, an odd last
    node carried up unchanged."""
    if not hashes:
        raise CommitmentError("a state has at least one chunk")
    level = list(hashes)
    while len(level) > 1:
        paired = [hashlib.sha256(_NODE_PREFIX + level[i] + level[i + 1]).digest()
                  for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def state_length(state: Sequence[np.ndarray]) -> int:
    """The length in bytes of the state's canonical bytes."""
    return sum(len(tensor_header(np.shape(t))) + 4 * int(np.size(t)) for t in state)


def _leaf(state: Sequence[np.ndarray], hashes: Sequence[bytes]) -> bytes:
    root = merkle_of_chunks(hashes)
    return hashlib.sha256(_LEAF_PREFIX + struct.pack("<Q", state_length(state)) + root).digest()


def state_leaf(state: Sequence[np.ndarray], *, threads: int | None = None) -> bytes:
    """Leaf of a state: ``sha256(0x02 ‖ uint64 LE byte length ‖ chunk root)``."""
    return _leaf(state, chunk_hashes(state, threads=threads))


def state_leaves(states: Sequence[Sequence[np.ndarray]], *,
                 threads: int | None = None) -> list[bytes]:
    """The leaves of many states at once: every chunk of every state goes to one pool of
    ``threads``, so that a trace of many small states keeps every core busy too."""
    cut = [_runs(_pieces(state)) for state in states]
    hashes = _hash_all([item for items in cut for item in items], threads)
    leaves, position = [], 0
    for state, items in zip(states, cut, strict=True):
        count = sum(_count(item) for item in items)
        leaves.append(_leaf(state, hashes[position : position + count]))
        position += count
    return leaves
