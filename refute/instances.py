"""Poseidon where a proof needs it, and the binding of a proof to a committed result
(DESIGN.md "Adjudication circuit", "Binding").

A state is committed by its SHA-256 leaf (:mod:`refute.leaves`). A proof hashes what it proves
with EZKL's Poseidon: each tensor fed to the circuit, quantized exactly as ``ezkl.float_to_felt``
does at the model's scale (a whole-number model input at scale 0). The proof counts for a result
only if

1. the revealed states reproduce their committed leaves, and
2. the proof's hash instances equal Poseidon of the quantized tensors of exactly those states
   (of the slices a tile's proof takes, cut from them by the manifest's tiling:
   :func:`refute.tiling.cut_input` of state i-1, :func:`refute.tiling.cut_output` of state i;
   of the chunk a range proof on a chunk takes, :meth:`refute.chunks.Chunking.cut`, which must
   be the chunk holding the state's largest |v|).

:func:`check_binding` checks both and names the first that fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refute.chunks import Chunking
from refute.errors import BindingError, CommitmentError
from refute.leaves import state_leaf
from refute.loading import TensorSpec
from refute.poseidon import poseidon_hash_many
from refute.quantize import check_scale, quantize, quantize_whole
from refute.tiling import Tile, Tiling, cut_input, cut_output

State = Sequence[np.ndarray]


def hash_states(
    states: Sequence[State],
    scale: int,
    *,
    specs: Sequence[Sequence[TensorSpec]] | None = None,
    workers: int | None = None,
) -> list[list[int]]:
    """Poseidon hash of every tensor of every state, quantized at ``scale``: the hash instances
    a proof over these states exposes. A tensor whose spec (``specs``, aligned with ``states``)
    is whole (:attr:`TensorSpec.whole`) is quantized at scale 0 and must hold whole numbers.

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


def check_binding(
    *,
    scale: int,
    specs: Sequence[Sequence[TensorSpec]],
    indices: Sequence[int],
    states: Sequence[State],
    leaves: Sequence[bytes],
    instances: Sequence[int],
    tile: tuple[Tiling, Tile] | None = None,
    chunk: tuple[Chunking, int] | None = None,
) -> None:
    """Check that ``states`` (state ``indices[n]`` of the result, in the order the proof takes
    them) reproduce their committed ``leaves`` and that the proof's hash ``instances`` are
    Poseidon of their quantized tensors; ``specs`` holds every state's tensor specs. With
    ``tile`` (a step's two states), the instances are of the tile's slices, cut here from the
    revealed states; with ``chunk`` (a range proof's one state: its chunking and the chunk the
    proof names), of that chunk, which must also be the one holding the state's largest |v|.

    Raises :class:`BindingError` naming the state (and tensor) at fault.
    """
    if len(indices) != len(states):
        raise BindingError("the binding needs one revealed state per state the proof takes")
    for k, state in zip(indices, states, strict=True):
        if not 0 <= k < len(leaves):
            raise BindingError(f"state {k} is outside the commitment")
        if state_leaf(state) != leaves[k]:
            raise BindingError(f"revealed state {k} does not match its committed leaf")
    revealed = states
    if tile is not None:
        states, taken = _tile_slices(tile, specs, indices, states)
    elif chunk is not None:
        states, taken = _chunk_slice(chunk, specs, indices, states)
    else:
        taken = [specs[k] for k in indices]
    expected = sum(len(state) for state in states)
    if len(instances) != expected:
        raise BindingError(f"the proof has {len(instances)} hash instances, the states it "
                           f"takes hold {expected} tensors")
    try:
        hashes = hash_states(states, scale, specs=taken)
    except CommitmentError as exc:
        raise BindingError(f"the revealed states cannot be quantized: {exc.reason}") from exc
    position = 0
    for k, state_specs, state_hashes in zip(indices, taken, hashes, strict=True):
        for j, h in enumerate(state_hashes):
            if instances[position] != h:
                raise BindingError(f"the proof's hash instance {position} is not Poseidon of "
                                   f"state {k} tensor {state_specs[j].name!r}")
            position += 1
    if chunk is not None:
        _check_worst_chunk(chunk, indices[0], revealed[0])


def _tile_slices(tile: tuple[Tiling, Tile], specs: Sequence[Sequence[TensorSpec]],
                 indices: Sequence[int], states: Sequence[State]
                 ) -> tuple[list[State], list[Sequence[TensorSpec]]]:
    """A tile's slices of states i-1 and i, and their specs: a tile reads some tensors of
    state i-1 and computes one of state i."""
    if len(states) != 2:
        raise BindingError("a tile's proof takes states i-1 and i")
    tiling, chosen = tile
    return ([cut_input(tiling, chosen, states[0]), cut_output(tiling, chosen, states[1])],
            [[specs[indices[0]][j] for j in chosen.input_indices],
             [specs[indices[1]][chosen.output_index]]])


def _chunk_slice(chunk: tuple[Chunking, int], specs: Sequence[Sequence[TensorSpec]],
                 indices: Sequence[int], states: Sequence[State]
                 ) -> tuple[list[State], list[Sequence[TensorSpec]]]:
    """The named chunk of a range proof's one state, and its spec."""
    if len(states) != 1:
        raise BindingError("a range proof on a chunk takes one state")
    chunking, index = chunk
    k = indices[0]
    try:
        return ([[chunking.cut(states[0], index)]], [[chunking.spec(specs[k], index)]])
    except BindingError as exc:
        raise BindingError(f"state {k}: {exc.reason}") from exc


def _check_worst_chunk(chunk: tuple[Chunking, int], k: int, state: State) -> None:
    """A range proof on a chunk speaks for the whole state only if it is of the chunk holding
    the state's largest |v| (:meth:`Chunking.worst`)."""
    chunking, index = chunk
    try:
        worst = chunking.worst(state)
    except CommitmentError as exc:
        raise BindingError(f"state {k}: {exc.reason}") from exc
    if worst != index:
        raise BindingError(f"the range proof is of chunk {index} of state {k}, but the chunk "
                           f"holding its largest |v| is chunk {worst}")
