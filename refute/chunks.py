"""Range chunks: the range of a large state proven on one chunk of it (DESIGN.md "Range rule").

A state whose whole range circuit would be too large is proven on a **chunk**: each tensor of
the state is flattened (C order) and cut into blocks of B elements, the last one padded with
zeros (which cannot raise max |v|). Chunks are numbered over the whole state, tensor 0's first,
then tensor 1's, and so on. A chunk is given to its circuit as one tensor of shape ``[B]`` with
its tensor's element type, so one range-chunk circuit per (B, element type) serves every chunk
of every chunked state of a model (:func:`circuits.range_graph.chunk_model`).

The chunk proven is the one holding the state's largest |v| (the first such): anyone holding the
revealed state finds it, so a range proof on a chunk is bound to exactly that chunk
(:func:`refute.instances.check_binding`), and "in range" is said of the whole state. A state
holding a NaN or an infinity has no range proof: it is refused when it is uploaded or disclosed.

The manifest's range entry of a chunked state records ``"chunking": {"chunk": B, "chunks":
[chunks of tensor 0, …]}`` (:meth:`Chunking.to_json`) and, per chunk circuit, its graph's sha256
and settings (``"models"``, :func:`circuits.range_graph.chunk_circuit`); an entry without it is
proven whole (docs/FORMATS.md, "Calibrated manifest fields").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refute.errors import BindingError, BundleError, CommitmentError
from refute.loading import TensorSpec

#: The key of a range entry's chunking in the manifest.
CHUNKING = "chunking"


@dataclass(frozen=True)
class Chunking:
    """How a state is cut into chunks: ``size`` (B) elements each, ``counts[j]`` chunks of
    tensor j."""

    size: int
    counts: tuple[int, ...]

    @classmethod
    def of(cls, specs: Sequence[TensorSpec], size: int) -> Chunking:
        """The chunking of a state with these tensor specs into chunks of ``size`` elements."""
        if size < 1:
            raise ValueError(f"a chunk holds at least one element, not {size}")
        return cls(size, tuple(math.ceil(spec.size / size) for spec in specs))

    @property
    def total(self) -> int:
        """How many chunks the state has."""
        return sum(self.counts)

    def locate(self, chunk: int) -> tuple[int, int]:
        """(tensor index, offset of the chunk's first element in the flattened tensor)."""
        if not 0 <= chunk < self.total:
            raise BindingError(f"the state has chunks 0..{self.total - 1}, not {chunk}")
        first = 0
        for j, count in enumerate(self.counts):
            if chunk < first + count:
                return j, (chunk - first) * self.size
            first += count
        raise AssertionError("unreachable: chunk is below the total")  # pragma: no cover

    def cut(self, state: Sequence[np.ndarray], chunk: int) -> np.ndarray:
        """Chunk ``chunk`` of ``state``: ``size`` elements, zeros past its tensor's end."""
        j, start = self.locate(chunk)
        flat = np.asarray(state[j]).reshape(-1)[start:start + self.size]
        out = np.zeros(self.size, dtype=flat.dtype)
        out[:flat.size] = flat
        return out

    def spec(self, specs: Sequence[TensorSpec], chunk: int) -> TensorSpec:
        """The spec of chunk ``chunk`` as its circuit takes it: its tensor's element type,
        shape ``[size]``, named after the tensor and the elements it holds."""
        j, start = self.locate(chunk)
        tensor = specs[j]
        return TensorSpec(f"{tensor.name}[{start}:{start + self.size}]", tensor.elem_type,
                          (self.size,), declared=tensor.declared)

    def worst(self, state: Sequence[np.ndarray]) -> int:
        """The chunk holding the state's largest |v| (the first, on a tie). Raises
        :class:`CommitmentError` on a NaN or an infinity (such a state has no range proof)."""
        best_chunk, best = 0, -1.0
        first = 0
        for j, tensor in enumerate(state):
            flat = np.abs(np.asarray(tensor, dtype=np.float64).reshape(-1))
            if not np.isfinite(flat).all():
                raise CommitmentError(f"tensor {j} holds a non-finite value: the state breaks "
                                      "the range rule and has no range proof")
            if flat.size and float(flat.max()) > best:
                best, best_chunk = float(flat.max()), first + int(flat.argmax()) // self.size
            first += self.counts[j]
        return best_chunk

    def to_json(self) -> dict[str, Any]:
        """The manifest's record: ``{"chunk": B, "chunks": [per tensor]}``."""
        return {"chunk": self.size, "chunks": list(self.counts)}

    @classmethod
    def from_json(cls, data: Any, specs: Sequence[TensorSpec]) -> Chunking:
        """Read a manifest's record, checked against the state's specs (:class:`BundleError`
        naming what is wrong)."""
        if not isinstance(data, Mapping):
            raise BundleError("malformed manifest: a range chunking must be an object")
        size, counts = data.get("chunk"), data.get("chunks")
        if type(size) is not int or size < 1:
            raise BundleError("malformed manifest: a range chunk size must be a positive integer")
        chunking = cls.of(specs, size)
        if not isinstance(counts, list) or tuple(counts) != chunking.counts:
            raise BundleError(f"malformed manifest: chunks of {size} elements cut the state into "
                              f"{list(chunking.counts)} chunks per tensor, not {counts!r}"[:200])
        return chunking


def range_chunking(circuits: Iterable[Mapping[str, Any]] | None, k: int,
                   specs: Sequence[TensorSpec]) -> Chunking | None:
    """State k's chunking as the manifest's ``circuits`` record it (``None``: proven whole, or
    no range entry)."""
    for entry in circuits or ():
        if entry.get("kind") == "range" and entry.get("state") == k:
            data = entry.get(CHUNKING)
            return None if data is None else Chunking.from_json(data, specs)
    return None
