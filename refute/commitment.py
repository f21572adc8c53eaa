"""Trace commitments: state leaves and their Merkle root (DESIGN.md "leaf k", "trace").

Leaf k is the SHA-256 chunked root of state k's canonical bytes (:mod:`refute.leaves`); the
commitment is the list of N+1 leaves and their keccak Merkle root (:mod:`refute.merkle`), the
word a result carries and its provider signs. Nothing here quantizes or computes Poseidon: that
happens only over what a proof hashes (:mod:`refute.instances`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refute.errors import BundleError, CommitmentError
from refute.leaves import LEAF_FORMAT, state_leaves
from refute.merkle import MerkleProof, merkle_proof, merkle_root
from refute.quantize import check_scale


@dataclass(frozen=True)
class TraceCommitment:
    """The provider's commitment to one execution: N+1 leaves, their root, and the scale."""

    scale: int
    leaves: tuple[bytes, ...]
    root: bytes

    @classmethod
    def from_leaves(cls, scale: int, leaves: Sequence[bytes]) -> TraceCommitment:
        """The commitment of the given leaves."""
        leaves = tuple(leaves)
        return cls(scale=check_scale(scale), leaves=leaves, root=merkle_root(leaves))

    @classmethod
    def of_states(cls, scale: int, states: Sequence[Sequence[np.ndarray]], *,
                  threads: int | None = None) -> TraceCommitment:
        """The commitment of ``states`` (float32 tensors, state order)."""
        return cls.from_leaves(scale, state_leaves(states, threads=threads))

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
            "leaf_format": LEAF_FORMAT,
            "scale": self.scale,
            "leaves": ["0x" + leaf.hex() for leaf in self.leaves],
            "root": "0x" + self.root.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> TraceCommitment:
        """Parse and check the JSON form: the root must match the leaves."""
        if isinstance(data, dict) and data.get("leaf_format") != LEAF_FORMAT:
            raise BundleError(
                f"the commitment's leaves are {data.get('leaf_format', 'Poseidon leaves')!r}, "
                f"not {LEAF_FORMAT!r}: commitments made before refute's SHA-256 leaves are "
                "no longer accepted; trace the input again")
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
