"""Cutting a model into standalone segments, and the states that flow between them.

Nodes of the canonical model are numbered 1..M in topological order. Cuts c0=0 < c1 < … < cN=M
split them into segments: segment i (1-based) holds nodes (c(i-1), ci], i.e. the Python slice
``nodes[c(i-1):ci]``.

State k is the set of tensors *live* at cut k: produced at or before it (or a graph input) and
used after it (or a graph output). State 0 is the model's inputs and state N its outputs; weights
are never state. Tensor order inside a state is fixed:

* state 0: graph inputs in graph order;
* state N: graph outputs in graph order;
* otherwise: graph inputs first (graph order), then tensors by producing node position and output
  index.

Segment i is a standalone ONNX model whose inputs are state i-1 and whose outputs are state i, in
that order. A tensor that only passes through a segment (a skip connection) is copied by an
``Identity`` node onto an output named ``<name>::pass``; outputs are matched to the state by
position, never by name. Segment bytes are serialized deterministically, so anyone can rebuild a
segment from the model and the cuts and check its sha256 against the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper

from refute.errors import ModelTooLarge, SegmentationError
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, TensorSpec, serialize
from refute.quantize import quantize

#: Operators that make a segment of their own under the default policy.
HEAVY_OPS: frozenset[str] = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"})

#: Operators that read a whole axis to produce each output element, and start a segment of
#: their own when they follow a heavy node: kept with it, they would make every tile of the
#: segment (DESIGN.md, "Registration" step 4) compute whole rows of the heavy node (a
#: LayerNormalization after a 3072→768 MatMul: 2.4M multiply-accumulates per row; a Softmax
#: after Q·Kᵀ: every tile hashes its head's whole Kᵀ) or read the whole input (a global pool
#: after a 1×1 Conv reads every channel at every position).
#: A normalization keeps the heavy node after it (its segment starts there and the MatMul that
#: follows needs whole rows of it anyway); a global pool stays alone, since whatever mixes
#: channels after it needs the whole pooled vector, that is, the whole feature map.
NORMALIZING_OPS: frozenset[str] = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})
POOLING_OPS: frozenset[str] = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})

PASS_SUFFIX = "::pass"

#: Bound on the weights all segments hold together. Each segment is a standalone model with a
#: copy of every weight it uses, so one weight shared by many segments is copied many times
#: (a 16 MiB weight used by 4,096 MatMuls would be 64 GiB); checked before any segment is built.
MAX_SEGMENT_WEIGHT_BYTES = 2**30


@dataclass(frozen=True)
class Segment:
    """One standalone segment: nodes ``(start, end]`` as an ONNX model."""

    index: int
    start: int
    end: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_types: tuple[str, ...]
    onnx_bytes: bytes
    #: Names of the segment graph's outputs, position-aligned with ``outputs``.
    graph_outputs: tuple[str, ...]

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash of the segment's ONNX bytes."""
        return hashlib.sha256(self.onnx_bytes).hexdigest()


@dataclass(frozen=True)
class Segmentation:
    """A model cut into segments, with the states between them."""

    model: LoadedModel
    cuts: tuple[int, ...]
    states: tuple[tuple[TensorSpec, ...], ...]
    segments: tuple[Segment, ...]

    @property
    def num_segments(self) -> int:
        """N, the number of segments (states are numbered 0..N)."""
        return len(self.segments)


# --- liveness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Liveness:
    """Where each non-constant tensor is produced and last needed, in node positions."""

    produced_at: Mapping[str, int]  # -1 for graph inputs; node index (0-based) otherwise
    order_key: Mapping[str, tuple[int, int]]
    last_use: Mapping[str, int]  # last 0-based node index using it; M for graph outputs

    @classmethod
    def of(cls, loaded: LoadedModel) -> _Liveness:
        nodes = loaded.nodes
        produced: dict[str, int] = {}
        key: dict[str, tuple[int, int]] = {}
        for j, name in enumerate(loaded.input_names):
            produced[name] = -1
            key[name] = (-1, j)
        for i, node in enumerate(nodes):
            for j, name in enumerate(node.output):
                if name:
                    produced[name] = i
                    key[name] = (i, j)
        last: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.input:
                if name in produced:
                    last[name] = i
        for name in loaded.output_names:
            last[name] = len(nodes)
        return cls(produced, key, last)

    def live_at(self, loaded: LoadedModel, cut: int) -> tuple[str, ...]:
        """Names of the tensors of the state at ``cut``, in state order."""
        if cut == 0:
            return loaded.input_names
        if cut == len(loaded.nodes):
            return loaded.output_names
        live = [
            name
            for name, at in self.produced_at.items()
            if at < cut and self.last_use.get(name, -2) >= cut
        ]
        return tuple(sorted(live, key=lambda n: self.order_key[n]))


def state_names(loaded: LoadedModel, cuts: Sequence[int]) -> list[tuple[str, ...]]:
    """The tensor names of every state for these cuts (validated)."""
    _validate_cuts(loaded, cuts)
    liveness = _Liveness.of(loaded)
    return [liveness.live_at(loaded, c) for c in cuts]


# --- cut policies --------------------------------------------------------------------------


def default_cuts(loaded: LoadedModel) -> tuple[int, ...]:
    """One segment per compute-heavy node; light nodes merge into the segment before them.

    Light nodes before the first heavy node join the first segment. A normalization or global
    pool after a heavy node starts a segment (:data:`NORMALIZING_OPS`, :data:`POOLING_OPS`): a
    normalization's segment goes on through the next heavy node, a pool's ends before it. A
    candidate cut whose state would hold a non-float32 tensor is skipped (the two segments
    merge).
    """
    nodes = loaded.nodes
    liveness = _Liveness.of(loaded)
    cuts = [0]
    heavy = False  # the current segment holds a heavy node
    pooled = False  # the current segment starts with a global pool
    for i, node in enumerate(nodes):
        op = node.op_type
        starts = (op in HEAVY_OPS and (heavy or pooled)) or \
            (op in NORMALIZING_OPS | POOLING_OPS and heavy)
        if starts and i > 0 and _float_state(loaded, liveness, i):
            cuts.append(i)
            heavy, pooled = False, op in POOLING_OPS
        heavy = heavy or op in HEAVY_OPS
    cuts.append(len(nodes))
    return tuple(cuts)


def balanced_cuts(loaded: LoadedModel, max_segments: int) -> tuple[int, ...]:
    """At most ``max_segments`` segments of balanced cost, each cut where the state is narrow.

    Cost is an estimate of multiply-accumulates per node (see :func:`node_cost`). Cuts are
    chosen among the default cuts to balance cost; each then moves back to the narrowest state
    (fewest bytes) after the compute-heavy node before it, so that a trace commits, and a check
    discloses, as little as the model allows: in a transformer that is the residual stream
    between blocks, not the residual and its normalized copy before the next MatMul. Ties keep
    the default cut; positions whose state would hold a non-float32 tensor are never cut.
    """
    if max_segments < 1:
        raise SegmentationError("the maximum segment count must be at least 1")
    candidates = default_cuts(loaded)
    if len(candidates) - 1 <= max_segments:
        return candidates
    costs = [node_cost(loaded, n) for n in loaded.nodes]
    prefix = [0, *np.cumsum(costs).tolist()]
    total = prefix[-1]
    chosen = [0]
    interior = list(candidates[1:-1])
    for j in range(1, max_segments):
        target = total * j / max_segments
        usable = [c for c in interior if c > chosen[-1]]
        # Leave enough candidates for the remaining cuts.
        remaining = max_segments - 1 - j
        if remaining:
            usable = usable[:-remaining] if len(usable) > remaining else []
        if not usable:
            break
        chosen.append(min(usable, key=lambda c: (abs(prefix[c] - target), c)))
    chosen.append(len(loaded.nodes))
    return _narrowed(loaded, candidates, tuple(chosen))


def _narrowed(loaded: LoadedModel, candidates: Sequence[int],
              cuts: tuple[int, ...]) -> tuple[int, ...]:
    """Move every interior cut c back to the narrowest usable position after the default cut
    before it (so the heavy node there stays in the earlier segment); ties keep c."""
    width, usable = _state_widths(loaded)
    before = {c: max((p for p in candidates if p < c), default=0) for c in cuts[1:-1]}
    moved = [cuts[0]]
    for c in cuts[1:-1]:
        low = max(before[c], moved[-1]) + 1
        moved.append(min((p for p in range(low, c + 1) if usable[p]),
                         key=lambda p: (width[p], -p)))
    moved.append(cuts[-1])
    return tuple(moved)


def _state_widths(loaded: LoadedModel) -> tuple[list[int], list[bool]]:
    """For every cut position 0..M: the bytes of the state there, and whether a state may be
    cut there (every tensor of it carried, see :func:`_carried`). One sweep over the tensors'
    live ranges (a tensor produced by node p and last used by node l is in states p+1..l)."""
    liveness = _Liveness.of(loaded)
    m = len(loaded.nodes)
    width_step = [0] * (m + 2)
    bad_step = [0] * (m + 2)
    for name, produced in liveness.produced_at.items():
        last = liveness.last_use.get(name)
        if last is None or last <= produced:
            continue
        spec = loaded.tensors[name]
        width_step[produced + 1] += 4 * spec.size
        width_step[last + 1] -= 4 * spec.size
        if not _carried(spec, max(produced + 1, 1)):  # cut 0 is never an interior cut
            bad_step[produced + 1] += 1
            bad_step[last + 1] -= 1
    widths = np.cumsum(width_step[: m + 1]).tolist()
    usable = [bad == 0 for bad in np.cumsum(bad_step[: m + 1]).tolist()]
    return widths, usable


def node_cost(loaded: LoadedModel, node: NodeProto) -> int:
    """Estimated multiply-accumulates of one node (output elements for light nodes)."""
    out = loaded.tensors.get(node.output[0]) if node.output else None
    out_elems = out.size if out is not None else 1
    weights = {t.name: t for t in loaded.model.graph.initializer}

    def dims_of(name: str) -> tuple[int, ...]:
        if name in loaded.tensors:
            return loaded.tensors[name].shape
        if name in weights:
            return tuple(weights[name].dims)
        return ()

    if node.op_type in ("Gemm", "MatMul"):
        a = dims_of(node.input[0])
        trans_a = any(a_.name == "transA" and a_.i for a_ in node.attribute)
        inner = (a[-2] if trans_a and len(a) >= 2 else a[-1]) if a else 1
        return out_elems * inner
    if node.op_type in ("Conv", "ConvTranspose"):
        w = dims_of(node.input[1])
        return out_elems * (math.prod(w[1:]) if len(w) > 1 else 1)
    return out_elems


def _float_state(loaded: LoadedModel, liveness: _Liveness, cut: int) -> bool:
    return all(_carried(loaded.tensors[n], cut) for n in liveness.live_at(loaded, cut))


def _carried(spec: TensorSpec, cut: int) -> bool:
    """Whether a state at ``cut`` may hold ``spec``: float32 tensors, and whole-number inputs
    in state 0 only (segment 1 casts them to their declared type)."""
    return spec.elem_type == TensorProto.FLOAT and (cut == 0 or not spec.whole)


def _validate_cuts(loaded: LoadedModel, cuts: Sequence[int]) -> None:
    m = len(loaded.nodes)
    if len(cuts) < 2 or cuts[0] != 0 or cuts[-1] != m:
        raise SegmentationError(f"cuts must start at 0 and end at the node count {m}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise SegmentationError("cuts must be strictly increasing (no empty segment)")


def normalize_cuts(loaded: LoadedModel, cuts: Iterable[int]) -> tuple[int, ...]:
    """Accept interior cuts (or a full list with 0 and M) and return the full list."""
    m = len(loaded.nodes)
    values = sorted(set(int(c) for c in cuts))
    bad = [c for c in values if c < 0 or c > m]
    if bad:
        raise SegmentationError(f"cut positions {bad} are outside 0..{m}")
    full = tuple(sorted({0, m, *values}))
    _validate_cuts(loaded, full)
    return full


# --- building segments ---------------------------------------------------------------------


def segment_model(
    loaded: LoadedModel,
    *,
    cuts: Sequence[int] | None = None,
    max_segments: int | None = None,
    max_weight_bytes: int = MAX_SEGMENT_WEIGHT_BYTES,
) -> Segmentation:
    """Split ``loaded`` at ``cuts`` (explicit), or by the default policy capped at
    ``max_segments``. Raises :class:`SegmentationError` on invalid cuts or non-float states,
    and :class:`~refute.errors.ModelTooLarge` if the segments would hold more than
    ``max_weight_bytes`` of weights in total (weights shared by segments are copied)."""
    if cuts is not None and max_segments is not None:
        raise SegmentationError("give either explicit cuts or a maximum segment count, not both")
    if cuts is not None:
        full = normalize_cuts(loaded, cuts)
    elif max_segments is not None:
        full = balanced_cuts(loaded, max_segments)
    else:
        full = default_cuts(loaded)
    names = state_names(loaded, full)
    states: list[tuple[TensorSpec, ...]] = []
    for k, state in enumerate(names):
        specs = tuple(loaded.tensors[n] for n in state)
        bad = [s.name for s in specs if not _carried(s, full[k])]
        if bad:
            raise SegmentationError(f"state {k} would hold non-float32 tensors (or integer "
                                   f"inputs past state 0) {bad}")
        if not specs:
            raise SegmentationError(f"state {k} would be empty")
        states.append(specs)
    _check_segment_weights(loaded, full, max_weight_bytes)
    segments = tuple(
        _build_segment(
            loaded, index=i, start=full[i - 1], end=full[i], inputs=states[i - 1],
            outputs=states[i],
        )
        for i in range(1, len(full))
    )
    return Segmentation(loaded, full, tuple(states), segments)


def _check_segment_weights(loaded: LoadedModel, cuts: Sequence[int], limit: int) -> None:
    """Refuse, from the declared sizes only, segments that would copy too many weight bytes."""
    sizes = {t.name: math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
             .itemsize for t in loaded.model.graph.initializer}
    nodes = loaded.nodes
    total = 0
    for start, end in itertools.pairwise(cuts):
        used = {x for n in nodes[start:end] for x in n.input if x in sizes}
        total += sum(sizes[x] for x in used)
        if total > limit:
            raise ModelTooLarge(
                f"the segments would hold over {limit} bytes of weights (each segment copies the "
                f"weights it uses; segment ending at node {end} passes the limit)"
            )


def _build_segment(
    loaded: LoadedModel,
    *,
    index: int,
    start: int,
    end: int,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
) -> Segment:
    source = loaded.model
    nodes = [_copy_node(n) for n in source.graph.node[start:end]]
    produced_inside = {o for n in nodes for o in n.output if o}
    input_names = {s.name for s in inputs}
    graph_outputs: list[str] = []
    for spec in outputs:
        if spec.name in produced_inside:
            graph_outputs.append(spec.name)
        elif spec.name in input_names:
            alias = spec.name + PASS_SUFFIX
            nodes.append(helper.make_node("Identity", [spec.name], [alias], name=alias))
            graph_outputs.append(alias)
        else:  # cannot happen for states computed by _Liveness; guard the invariant anyway
            raise SegmentationError(f"segment {index} cannot produce state tensor {spec.name!r}")
    used = {x for n in nodes for x in n.input if x}
    initializers = [t for t in source.graph.initializer if t.name in used]
    value_info = [
        v for v in source.graph.value_info
        if v.name in produced_inside and v.name not in graph_outputs
    ]
    graph = helper.make_graph(
        nodes,
        f"refute_segment_{index}",
        [_value_info(s.name, s) for s in inputs],
        [_value_info(g, s) for g, s in zip(graph_outputs, outputs, strict=True)],
        initializer=initializers,
        value_info=value_info,
    )
    model = standalone_model(
        graph, opset_imports=source.opset_import, ir_version=source.ir_version,
        label=f"segment {index}",
    )
    return Segment(
        index=index,
        start=start,
        end=end,
        inputs=inputs,
        outputs=outputs,
        op_types=tuple(n.op_type for n in source.graph.node[start:end]),
        onnx_bytes=serialize(model),
        graph_outputs=tuple(graph_outputs),
    )


def standalone_model(
    graph: onnx.GraphProto,
    *,
    opset_imports: Sequence[onnx.OperatorSetIdProto],
    ir_version: int,
    label: str,
) -> ModelProto:
    """Wrap a graph refute generated into a model (producer ``refute``/``1``) and check it fully.

    A failure is an invariant broken by refute itself, reported as :class:`SegmentationError`.
    """
    model = helper.make_model(
        graph, opset_imports=list(opset_imports), ir_version=ir_version,
        producer_name="refute", producer_version="1",
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SegmentationError(f"{label} is not a valid ONNX model: {exc}") from exc
    return model


def _copy_node(node: NodeProto) -> NodeProto:
    copy = NodeProto()
    copy.CopyFrom(node)
    copy.doc_string = ""
    return copy


def _value_info(name: str, spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, spec.elem_type, list(spec.shape))


# --- running segments ----------------------------------------------------------------------


def run_segment(
    executor: DeterministicExecutor, segment: Segment, state: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Run one segment on its input state (arrays in state order); return its output state."""
    if len(state) != len(segment.inputs):
        raise SegmentationError(
            f"segment {segment.index} takes {len(segment.inputs)} tensors, got {len(state)}"
        )
    feeds = {spec.name: array for spec, array in zip(segment.inputs, state, strict=True)}
    return executor.run(segment.onnx_bytes, feeds, segment.graph_outputs, key=segment.sha256)


def run_segments(
    executor: DeterministicExecutor,
    segmentation: Segmentation,
    inputs: Mapping[str, np.ndarray],
) -> list[list[np.ndarray]]:
    """Run every segment in sequence from the model inputs; return all N+1 states."""
    state0 = [np.asarray(inputs[name]) for name in segmentation.model.input_names]
    states = [state0]
    for segment in segmentation.segments:
        states.append(run_segment(executor, segment, states[-1]))
    return states


def run_whole(
    executor: DeterministicExecutor, loaded: LoadedModel, inputs: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """Run the whole canonical model; return its outputs in graph order."""
    return executor.run(loaded.onnx_bytes, inputs, key=loaded.canonical_sha256)


def check_reproduces(
    executor: DeterministicExecutor,
    segmentation: Segmentation,
    inputs: Mapping[str, np.ndarray],
) -> None:
    """Raise :class:`SegmentationError` unless the segments in sequence reproduce the whole
    model's outputs bit for bit on ``inputs``."""
    whole = run_whole(executor, segmentation.model, inputs)
    final = run_segments(executor, segmentation, inputs)[-1]
    for spec, a, b in zip(segmentation.states[-1], whole, final, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            raise SegmentationError(
                f"segments do not reproduce output {spec.name!r} bit for bit"
            )


def step_difference_units(executor: DeterministicExecutor, segment: Segment,
                          before: Sequence[np.ndarray], after: Sequence[np.ndarray],
                          scale: int) -> int:
    """Re-execute ``segment`` on ``before`` and return the largest difference from ``after``,
    both quantized at ``scale`` (what a spot-check measures, and what a step proof bounds)."""
    worst = 0
    for mine, theirs in zip(run_segment(executor, segment, tuple(before)), after, strict=True):
        diff = np.abs(quantize(mine, scale) - quantize(theirs, scale))
        worst = max(worst, int(diff.max()) if diff.size else 0)
    return worst
