"""Trace commitments: tensor hashes, state leaves and the Merkle root (DESIGN.md "leaf k").

For state k with tensors t1..tm (in state order), each tensor is quantized at the model's scale
(:mod:`refute.quantize`; a model input of whole numbers at scale 0) and hashed with EZKL's
Poseidon (:mod:`refute.poseidon`), the same hash EZKL exposes as a public instance for a
*hashed* input. The leaf is ``keccak256(h1 ‖ … ‖ hm)`` with each hash as a 32-byte big-endian
word (the uint256 the chain sees). The commitment is the list of N+1 leaves and their Merkle
root (:mod:`refute.merkle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refute.errors import BundleError, CommitmentError
from refute.loading import TensorSpec
from refute.merkle import MerkleProof, keccak256, merkle_proof, merkle_root
from refute.poseidon import FIELD_MODULUS, poseidon_hash_many
from refute.quantize import check_scale, quantize, quantize_whole


def hash_word(value: int) -> bytes:
    """A field element as the 32-byte big-endian word the chain sees."""
    if not 0 <= value < FIELD_MODULUS:
        raise CommitmentError("a Poseidon hash must be a field element")
    return value.to_bytes(32, "big")


def state_leaf(tensor_hashes: Sequence[int]) -> bytes:
    """The leaf of a state: keccak256 of its tensors' Poseidon hashes, in state order."""
    if not tensor_hashes:
        raise CommitmentError("a state must hold at least one tensor")
    return keccak256(b"".join(hash_word(h) for h in tensor_hashes))


def hash_states(
    states: Sequence[Sequence[np.ndarray]],
    scale: int,
    *,
    specs: Sequence[Sequence[TensorSpec]] | None = None,
    workers: int | None = None,
) -> list[list[int]]:
    """Poseidon hash of every tensor of every state, quantized at ``scale``; a tensor whose
    spec (``specs``, aligned with ``states``) is whole (:attr:`TensorSpec.whole`) is quantized
    at scale 0 instead, and must hold whole numbers.

    All tensors are hashed in one batch so that work spreads over processes.
    """
    check_scale(scale)
    if specs is not None and [len(s) for s in specs] != [len(s) for s in states]:
        raise CommitmentError("state specs do not match the states")
    flat = [quantize_whole(t) if specs is not None and specs[k][j].whole else quantize(t, scale)
            for k, state in enumerate(states) for j, t in enumerate(state)]
    hashes = poseidon_hash_many(flat, workers=workers)
    out: list[list[int]] = []
    position = 0
    for state in states:
        out.append(hashes[position : position + len(state)])
        position += len(state)
    return out


@dataclass(frozen=True)
class TraceCommitment:
    """The provider's commitment to one execution: N+1 leaves, their root, and the scale."""

    scale: int
    leaves: tuple[bytes, ...]
    root: bytes

    @classmethod
    def from_hashes(cls, scale: int, tensor_hashes: Sequence[Sequence[int]]) -> TraceCommitment:
        """Build the commitment from every state's tensor hashes."""
        leaves = tuple(state_leaf(h) for h in tensor_hashes)
        return cls(scale=check_scale(scale), leaves=leaves, root=merkle_root(leaves))

    @property
    def num_states(self) -> int:
        """N+1."""
        return len(self.leaves)

    def proof(self, k: int) -> MerkleProof:
        """Inclusion proof of leaf k."""
        return merkle_proof(self.leaves, k)

    def to_json(self) -> dict[str, Any]:
        """JSON form (hex words with 0x prefix)."""
        return {
            "scale": self.scale,
            "leaves": ["0x" + leaf.hex() for leaf in self.leaves],
            "root": "0x" + self.root.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> TraceCommitment:
        """Parse and check the JSON form: the root must match the leaves."""
        try:
            leaves = tuple(_parse_word(x) for x in data["leaves"])
            root = _parse_word(data["root"])
            scale = check_scale(data["scale"])
        except (KeyError, TypeError, ValueError, CommitmentError) as exc:
            raise BundleError(f"malformed commitment: {exc}") from exc
        if not leaves:
            raise BundleError("malformed commitment: no leaves")
        if merkle_root(leaves) != root:
            raise BundleError("commitment root does not match its leaves")
        return cls(scale=scale, leaves=leaves, root=root)


def _parse_word(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("hash words must be hex strings")
    raw = bytes.fromhex(text.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError(f"hash word {text!r} is not 32 bytes")
    return raw
