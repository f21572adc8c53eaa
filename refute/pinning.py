"""Pinning the symbolic dimensions of a model's inputs to integers.

Real exports leave dimensions symbolic (``batch_size``, ``N``, unnamed ones). refute commits to
states of static shapes, so every symbolic dimension is pinned before shapes are inferred, in
this order of precedence:

1. ``--shape`` (whole input shapes by input name) and ``--dim`` (by ``dim_param`` name), given
   by the caller, always win;
2. the element count of each input in an input file (EZKL's ``input.json``: one flat list per
   input), which fixes the one dimension of that input still unknown;
3. the default EZKL applies: ``batch_size`` (and a symbolic leading dimension) is 1.

Whatever remains symbolic is refused with a reason naming the dimension. Every pin made is
recorded as a :class:`Pin` with its source, so that commands can print them and the API can
return them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from onnx import ModelProto, TensorShapeProto, ValueInfoProto

from refute.errors import ModelTooLarge, ShapeError

#: Where a pin came from.
FROM_SHAPE = "--shape"
FROM_DIM = "--dim"
FROM_INPUT = "input file"
FROM_DEFAULT = "default"

#: ``dim_param`` names read as a batch dimension (EZKL pins ``batch_size`` to 1 by default).
_BATCH_NAMES = frozenset({"batch_size", "batch", "batchsize"})


@dataclass(frozen=True)
class Pin:
    """One symbolic dimension of one input pinned to a value."""

    input: str
    axis: int
    #: The ``dim_param`` name, or ``""`` for an unnamed dimension.
    dim: str
    value: int
    #: :data:`FROM_SHAPE`, :data:`FROM_DIM`, :data:`FROM_INPUT` or :data:`FROM_DEFAULT`.
    source: str

    def describe(self) -> str:
        """``batch_size=1 (input[0], default)``."""
        label = self.dim or f"{self.input}[{self.axis}]"
        return f"{label}={self.value} ({self.input}[{self.axis}], {self.source})"

    def to_json(self) -> dict[str, object]:
        """JSON form."""
        return {"input": self.input, "axis": self.axis, "dim": self.dim, "value": self.value,
                "source": self.source}


def _symbol(dim: TensorShapeProto.Dimension) -> str | None:
    """The dimension's ``dim_param`` ("" if unnamed), or None if it is static."""
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return None
    return str(dim.dim_param)


def _is_batch(name: str, axis: int) -> bool:
    return name.lower() in _BATCH_NAMES or axis == 0


class _Resolver:
    """Pins of one model, checking that a named dimension gets one value everywhere."""

    def __init__(self, dims: Mapping[str, int]) -> None:
        self.dims = dims
        self.named: dict[str, int] = {}
        self.pins: list[Pin] = []

    def pin(self, value: ValueInfoProto, axis: int, name: str, pinned: int, source: str) -> None:
        if name:
            known = self.named.setdefault(name, pinned)
            if known != pinned:
                raise ShapeError(
                    f"dimension {name!r} is {known} for one input and {pinned} for input "
                    f"{value.name!r}: pin it with --dim {name}=N"
                )
        self.pins.append(Pin(value.name, axis, name, pinned, source))

    def resolve(self, value: ValueInfoProto, size: int | None) -> list[int]:
        """The static shape of ``value`` (an input with a declared shape)."""
        dims = list(value.type.tensor_type.shape.dim)
        shape: list[int | None] = []
        open_axes: list[int] = []
        for axis, dim in enumerate(dims):
            name = _symbol(dim)
            if name is None:
                shape.append(int(dim.dim_value))
            elif name and name in self.dims:
                shape.append(self.dims[name])
                self.pin(value, axis, name, self.dims[name], FROM_DIM)
            else:
                shape.append(None)
                open_axes.append(axis)
        if size is not None:
            self._from_size(value, dims, shape, open_axes, size)
        for axis in list(open_axes):
            name = _symbol(dims[axis]) or ""
            if _is_batch(name, axis):
                shape[axis] = 1
                open_axes.remove(axis)
                self.pin(value, axis, name, 1, FROM_DEFAULT)
        if open_axes:
            axis = open_axes[0]
            label = _symbol(dims[axis]) or f"{value.name}[{axis}]"
            raise ShapeError(
                f"input {value.name!r} has dynamic dimension {label!r} (axis {axis}): give an "
                "input file, or pin it with --dim NAME=N or --shape INPUT=D1,D2,..."
            )
        return [int(d) for d in shape if d is not None]

    def _from_size(self, value: ValueInfoProto, dims: Sequence[TensorShapeProto.Dimension],
                   shape: list[int | None], open_axes: list[int], size: int) -> None:
        """Fill the open axes of ``shape`` from the input file's element count ``size``."""
        if len(open_axes) > 1:
            # Batch-like axes default to 1 first; the input file then fixes the last one left.
            for axis in [a for a in open_axes if _is_batch(_symbol(dims[a]) or "", a)]:
                if len(open_axes) == 1:
                    break
                shape[axis] = 1
                open_axes.remove(axis)
                self.pin(value, axis, _symbol(dims[axis]) or "", 1, FROM_DEFAULT)
        known = math.prod(d for d in shape if d is not None)
        if not open_axes:
            if known != size:
                raise ShapeError(
                    f"the input file gives {size} values for input {value.name!r}, whose shape "
                    f"{shape} holds {known}"
                )
            return
        if len(open_axes) > 1:
            names = ", ".join(repr(_symbol(dims[a]) or f"{value.name}[{a}]") for a in open_axes)
            raise ShapeError(
                f"input {value.name!r} has dynamic dimensions {names}: the input file's {size} "
                "values fix only one; pin the others with --dim NAME=N"
            )
        axis = open_axes.pop()
        if known <= 0 or size % known or size == 0:
            raise ShapeError(
                f"the input file gives {size} values for input {value.name!r}, not a multiple of "
                f"the {known} values its static dimensions hold"
            )
        shape[axis] = size // known
        self.pin(value, axis, _symbol(dims[axis]) or "", size // known, FROM_INPUT)


def pin_input_shapes(
    model: ModelProto,
    *,
    shapes: Mapping[str, Sequence[int]],
    dims: Mapping[str, int],
    sizes: Sequence[int] | None,
    max_elements: int,
) -> tuple[Pin, ...]:
    """Give every real input of ``model`` a static shape, in place; return the pins made.

    ``sizes`` are the element counts of an input file, one per real input in graph order.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    real_inputs = [v for v in graph.input if v.name not in initializers]
    known = {v.name for v in real_inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise ShapeError(f"shape pinned for unknown input(s): {', '.join(unknown)}")
    for dim_name, pinned in dims.items():
        if not isinstance(pinned, int) or isinstance(pinned, bool) or pinned <= 0:
            raise ShapeError(f"dimension {dim_name!r} must be pinned to a positive integer")
    if sizes is not None and len(sizes) != len(real_inputs):
        raise ShapeError(
            f"the input file holds {len(sizes)} tensor(s), the model has {len(real_inputs)} "
            "input(s)"
        )
    resolver = _Resolver(dims)
    for n, value in enumerate(real_inputs):
        tensor_shape = value.type.tensor_type.shape
        if value.name in shapes:
            resolved = _whole_shape(value, list(shapes[value.name]))
            resolver.pins.extend(
                Pin(value.name, axis, _symbol(dim) or "", resolved[axis], FROM_SHAPE)
                for axis, dim in enumerate(tensor_shape.dim) if _symbol(dim) is not None
            )
        elif not value.type.tensor_type.HasField("shape"):
            raise ShapeError(f"input {value.name!r} has no shape: pin it with --shape")
        else:
            resolved = resolver.resolve(value, None if sizes is None else int(sizes[n]))
        if math.prod(resolved) > max_elements:
            raise ModelTooLarge(f"input {value.name!r} of shape {resolved} is over the limit")
        tensor_shape.Clear()
        for d in resolved:
            tensor_shape.dim.add().dim_value = d
    return tuple(resolver.pins)


def _whole_shape(value: ValueInfoProto, pin: list[int]) -> list[int]:
    """Check a ``--shape`` pin against the input's declared shape."""
    declared = value.type.tensor_type.HasField("shape")
    current = list(value.type.tensor_type.shape.dim) if declared else []
    if declared and len(pin) != len(current):
        raise ShapeError(
            f"input {value.name!r} has rank {len(current)}, pinned shape {pin} has rank "
            f"{len(pin)}"
        )
    if any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in pin):
        raise ShapeError(f"pinned shape {pin} of input {value.name!r} must be positive")
    for d, old in zip(pin, current, strict=False):
        if old.HasField("dim_value") and old.dim_value > 0 and old.dim_value != d:
            raise ShapeError(
                f"input {value.name!r} has dimension {old.dim_value} where {pin} pins {d}"
            )
    return pin
