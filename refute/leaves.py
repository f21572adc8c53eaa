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
speed of SHA-256. One native call (``refute/_sha256chunks.c``: OpenSSL's SHA-256, the GIL
released) hashes every chunk of every state of a trace over POSIX threads, without copying the
tensors, and builds each tree; Python only lists the buffers. Poseidon is computed only over what
a proof hashes (:mod:`refute.instances`).
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from refute.errors import CommitmentError

__all__ = ["CHUNK", "DTYPE_TAG", "LEAF_FORMAT", "canonical_pieces", "leaf_of_bytes", "state_bytes",
           "state_leaf", "state_leaves", "tensor_bytes", "tensor_header"]

#: The name of this leaf definition, recorded in manifests and commitments.
LEAF_FORMAT: Final[str] = "sha256-chunk4k/1"

#: Chunk size in bytes.
CHUNK: Final[int] = 4096
#: The dtype tag of every state tensor: little-endian float32.
DTYPE_TAG: Final[bytes] = b"<f4\x00"
#: Fewest chunks worth a thread of their own (starting a thread costs ~tens of µs; 256 chunks
#: take ~0.6 ms to hash).
_CHUNKS_PER_THREAD: Final[int] = 256
#: The native leaves (``refute/_sha256chunks.c``), built by ``scripts/bootstrap``: per-chunk calls
#: from Python cost as much as the hashing, and Python threads do not scale past the GIL.
_native: Any = importlib.import_module("refute._sha256chunks")


def tensor_header(shape: Sequence[int]) -> bytes:
    """The record header of a float32 tensor of ``shape``."""
    return DTYPE_TAG + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)


def tensor_bytes(tensor: np.ndarray) -> memoryview:
    """A float32 tensor's values as little-endian bytes in C order (a view when it already is
    one; copied otherwise)."""
    array = np.asarray(tensor)
    if array.dtype != np.float32:
        raise CommitmentError(f"a state tensor must be float32, got {array.dtype}")
    return np.ascontiguousarray(array, dtype="<f4").reshape(-1).view(np.uint8).data


def state_bytes(state: Sequence[np.ndarray]) -> bytes:
    """The canonical bytes of a state (for reference and tests; :func:`state_leaf` hashes the
    same bytes without building them in one piece)."""
    return b"".join(tensor_header(t.shape) + bytes(tensor_bytes(t)) for t in state)


def canonical_pieces(state: Sequence[np.ndarray]) -> list[memoryview]:
    """The canonical bytes of a state as pieces (each tensor's header, then its values):
    concatenated they are :func:`state_bytes`, without building them in one piece."""
    if not state:
        raise CommitmentError("a state must hold at least one tensor")
    pieces: list[memoryview] = []
    for tensor in state:
        pieces.append(memoryview(tensor_header(np.shape(tensor))))
        pieces.append(tensor_bytes(tensor))
    return pieces


def state_length(state: Sequence[np.ndarray]) -> int:
    """The length in bytes of the state's canonical bytes."""
    return sum(len(tensor_header(np.shape(t))) + 4 * int(np.size(t)) for t in state)


def state_leaf(state: Sequence[np.ndarray], *, threads: int | None = None) -> bytes:
    """Leaf of a state: ``sha256(0x02 ‖ uint64 LE byte length ‖ chunk root)``."""
    return state_leaves([state], threads=threads)[0]


def leaf_of_bytes(data: bytes | memoryview, *, threads: int | None = None) -> bytes:
    """The leaf of a state given as its canonical bytes (as one state travels alone)."""
    if not len(data):
        raise CommitmentError("a state's canonical bytes cannot be empty")
    return _leaves([[memoryview(data)]], threads)[0]


def state_leaves(states: Sequence[Sequence[np.ndarray]], *,
                 threads: int | None = None) -> list[bytes]:
    """The leaves of many states at once: every chunk of every state is hashed in one native
    call spread over ``threads`` (default: every core; fewer when there is too little work to
    share), so that a trace of many small states keeps every core busy too."""
    return _leaves([canonical_pieces(state) for state in states], threads)


def _leaves(pieces: Sequence[Sequence[memoryview]], threads: int | None) -> list[bytes]:
    if not pieces:
        return []
    chunks = sum(-(-sum(len(p) for p in state) // CHUNK) for state in pieces)
    wanted = threads if threads is not None else (os.cpu_count() or 1)
    workers = max(1, min(wanted, chunks // _CHUNKS_PER_THREAD))
    joined: bytes = _native.leaves(pieces, workers)
    return [joined[i : i + 32] for i in range(0, len(joined), 32)]
