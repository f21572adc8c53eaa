"""The keccak Merkle tree over leaves and its inclusion proofs."""

from __future__ import annotations

import hashlib

import pytest

from refute.errors import CommitmentError
from refute.merkle import (
    MerkleProof,
    keccak256,
    merkle_proof,
    merkle_root,
    verify_merkle_proof,
)


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(bytes([i])).digest() for i in range(n)]


def test_keccak_is_ethereums() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


@pytest.mark.parametrize("n", list(range(1, 18)))
def test_every_leaf_proves_and_nothing_else_does(n: int) -> None:
    leaves = _leaves(n)
    root = merkle_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, i)
        assert verify_merkle_proof(root, leaf, proof)
        assert MerkleProof.from_json(proof.to_json()) == proof
        assert not verify_merkle_proof(root, keccak256(leaf), proof)
        if n > 1:
            other = (i + 1) % n
            moved = MerkleProof(other, proof.n_leaves, proof.siblings)
            assert not verify_merkle_proof(root, leaf, moved)
        if proof.siblings:
            bent = (keccak256(proof.siblings[0]), *proof.siblings[1:])
            assert not verify_merkle_proof(root, leaf, MerkleProof(i, n, bent))


def test_root_binds_the_leaf_count() -> None:
    leaves = _leaves(3)
    padded = [*leaves, bytes(32)]
    assert merkle_root(leaves) != merkle_root(padded)
    proof = merkle_proof(leaves, 0)
    assert not verify_merkle_proof(merkle_root(padded), leaves[0], proof)
    assert not verify_merkle_proof(
        merkle_root(leaves), leaves[0], MerkleProof(0, 4, proof.siblings)
    )


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(CommitmentError):
        merkle_root([])
    with pytest.raises(CommitmentError):
        merkle_root([b"short"])
    with pytest.raises(CommitmentError):
        merkle_proof(_leaves(2), 2)
    with pytest.raises(CommitmentError):
        MerkleProof.from_json({"index": 0, "n_leaves": 1, "siblings": ["0x12"]})
