"""Tiling: every tile model computes exactly its slice of the segment's output."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from circuits.adjudication import adjudication_model
from refute.errors import UnprovableModel
from refute.executor import DeterministicExecutor
from refute.loading import load_model, serialize
from refute.segmentation import Segment, run_segment, segment_model
from refute.tiling import (
    Tiling,
    cut_input,
    cut_output,
    make_tiling,
    place_output,
    plan_tiling,
    tile_at,
    tile_model,
    tile_segment,
)

# --- building one-segment models -----------------------------------------------------------


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weights(shape: Sequence[int], seed: int = 1) -> np.ndarray:
    return _rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _segment(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, Sequence[int]],
    output: str | list[str],
    weights: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> Segment:
    """The whole model as one segment, loaded as the project loads models."""
    outputs = [output] if isinstance(output, str) else output
    graph = helper.make_graph(
        nodes, "tiled",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in (weights or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    loaded = load_model(serialize(model))
    return segment_model(loaded, cuts=[]).segments[0]


def _state(segment: Segment, seed: int = 0) -> list[np.ndarray]:
    return [_rng(seed).uniform(-2, 2, size=s.shape).astype(np.float32) for s in segment.inputs]


def _conv(
    c_in: int, c_out: int, size: int, *, kernel: int = 3, stride: int = 1, pad: int = 1,
    dilation: int = 1, group: int = 1, after: Sequence[str] = (),
) -> Segment:
    """A Conv (with bias) on ``[1, c_in, size, size]``, then element-wise ops ``after``."""
    nodes = [helper.make_node(
        "Conv", ["x", "w", "b"], ["conv"], kernel_shape=[kernel, kernel], strides=[stride] * 2,
        pads=[pad] * 4, dilations=[dilation] * 2, group=group)]
    weights = {"w": _weights([c_out, c_in // group, kernel, kernel]),
               "b": _weights([c_out], seed=2)}
    last = "conv"
    for j, op in enumerate(after):
        out = f"after{j}"
        if op == "Relu6":
            weights |= {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
            nodes.append(helper.make_node("Clip", [last, "lo", "hi"], [out]))
        elif op == "BatchNormalization":
            weights |= {f"bn{k}": _weights([c_out], seed=10 + k) for k in range(4)}
            weights["bn3"] = np.abs(weights["bn3"]) + 0.5
            nodes.append(helper.make_node(op, [last, "bn0", "bn1", "bn2", "bn3"], [out]))
        else:
            nodes.append(helper.make_node(op, [last], [out]))
        last = out
    return _segment(nodes, {"x": [1, c_in, size, size]}, last, weights)


def _whole_rows(segment: Segment) -> int:
    """The estimated rows of the segment as one tile."""
    return make_tiling(segment, [list(o.shape) for o in segment.outputs]).tile_rows


# --- the check every case runs -------------------------------------------------------------


def _assert_exact(executor: DeterministicExecutor, segment: Segment, tiling: Tiling,
                  seed: int = 0, *, atol: float = 0.0) -> None:
    """Every tile model, on its cut input, gives exactly (bit for bit; within ``atol`` if given)
    its window of the whole segment's output; the owned slices cover the output exactly once;
    every tile of one output has one input and output shape."""
    state = _state(segment, seed)
    whole = run_segment(executor, segment, state)
    rebuilt = [np.full_like(w, np.nan) for w in whole]
    covered = [np.zeros(w.shape, dtype=np.int64) for w in whole]
    shapes: dict[int, set[object]] = {}
    for tile in tiling.tiles:
        inputs = cut_input(tiling, tile, state)
        assert [x.shape for x in inputs] == list(tile.input_shapes)
        shapes.setdefault(tile.output_index, set()).add((tile.input_indices, tile.input_shapes))
        sub = tile_segment(segment, tiling, tile)
        got = run_segment(executor, sub, inputs)
        expected = cut_output(tiling, tile, whole)
        assert len(got) == len(expected) == 1
        for g, e in zip(got, expected, strict=True):
            assert g.shape == tiling.output_blocks[tile.output_index] == tile.output_shape
            if atol:
                np.testing.assert_allclose(g, e, rtol=0, atol=atol)
            else:
                assert g.tobytes() == e.tobytes(), f"tile {tile.index} differs"
        place_output(tiling, tile, got, rebuilt)
        covered[tile.output_index][tuple(slice(a, b) for a, b in tile.outputs[0])] += 1
        assert tile_at(tiling, [a for a, _ in tile.outputs[0]], tile.output_index) == tile
    assert all(len(v) == 1 for v in shapes.values())
    assert sorted(shapes) == list(range(len(whole)))
    assert all((c == 1).all() for c in covered)
    for r, w in zip(rebuilt, whole, strict=True):
        assert not np.isnan(r).any()
        if not atol:
            assert r.tobytes() == w.tobytes()


# --- convolutions --------------------------------------------------------------------------


CONVS = {
    "3x3_stride1_pad1_relu": lambda: _conv(4, 6, 10, after=["Relu"]),
    "3x3_stride2_pad1_first_mobilenet_layer": lambda: _conv(
        3, 32, 32, stride=2, after=["BatchNormalization", "Relu6"]),
    "depthwise_3x3": lambda: _conv(8, 8, 12, group=8, after=["BatchNormalization", "Relu6"]),
    "pointwise_1x1_relu": lambda: _conv(8, 16, 9, kernel=1, pad=0, after=["Relu"]),
    "dilation_2": lambda: _conv(3, 5, 11, dilation=2, pad=2, after=["Sigmoid"]),
    "grouped_2": lambda: _conv(4, 8, 8, group=2),
}


@pytest.mark.parametrize("build", CONVS.values(), ids=list(CONVS))
def test_conv_tiles_are_exact(
    build: Callable[[], Segment], executor: DeterministicExecutor
) -> None:
    segment = build()
    bound = _whole_rows(segment) // 3
    tiling = plan_tiling(segment, bound)
    assert len(tiling.tiles) > 1 and tiling.tile_rows <= bound
    _assert_exact(executor, segment, tiling)


def test_conv_spatial_and_channel_blocks(executor: DeterministicExecutor) -> None:
    """Blocks that do not divide the output: edge windows shift inward, still exact; spatial
    tiles of one channel block share one model."""
    segment = _conv(4, 6, 10, stride=2, after=["Relu"])
    tiling = make_tiling(segment, [1, 4, 2, 3])
    assert tiling.grid == (1, 2, 3, 2)
    _assert_exact(executor, segment, tiling)
    models = {serialize(tile_model(segment, tiling, t)) for t in tiling.tiles}
    assert len(models) == 2  # one per channel block


def test_depthwise_region_holds_only_its_channels() -> None:
    segment = _conv(8, 8, 12, group=8)
    tiling = make_tiling(segment, [1, 2, 12, 12])
    assert tiling.input_shapes == ((1, 2, 14, 14),)
    assert [t.inputs[0][1] for t in tiling.tiles] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_edge_tiles_are_zero_padded() -> None:
    segment = _conv(2, 2, 8)
    tiling = make_tiling(segment, [1, 2, 4, 4])
    first, last = tiling.tiles[0], tiling.tiles[-1]
    assert first.inputs[0][2:] == ((0, 5), (0, 5)) and first.input_pads[0][2:] == ((1, 0),) * 2
    assert last.inputs[0][2:] == ((3, 8), (3, 8)) and last.input_pads[0][2:] == ((0, 1),) * 2
    assert {x.shape for t in tiling.tiles for x in cut_input(tiling, t, _state(segment))} == {
        (1, 2, 6, 6)}


def test_residual_conv_reads_one_region_twice(executor: DeterministicExecutor) -> None:
    """x feeds a padded Conv and an Add: one region, cut for the Add by a Slice."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c", "x"], ["y"]),
    ]
    segment = _segment(nodes, {"x": [1, 3, 9, 9]}, "y", {"w": _weights([3, 3, 3, 3])})
    tiling = make_tiling(segment, [1, 3, 4, 4])
    assert "Slice" in {n.op_type for n in tile_model(segment, tiling, tiling.tiles[0]).graph.node}
    _assert_exact(executor, segment, tiling)


def test_global_pool_then_flatten(executor: DeterministicExecutor) -> None:
    """MobileNet's tail: average over the whole 7x7 map, flatten, tiled by channels."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[7, 7]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    segment = _segment(nodes, {"x": [1, 4, 7, 7]}, "y", {"w": _weights([12, 4, 1, 1])})
    tiling = make_tiling(segment, [1, 5])
    _assert_exact(executor, segment, tiling)


def test_explicit_pad_before_a_strided_conv(executor: DeterministicExecutor) -> None:
    """TF-style MobileNet: Pad (zeros, asymmetric) then an unpadded stride-2 Conv."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2]),
    ]
    weights = {"pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "w": _weights([4, 3, 3, 3])}
    segment = _segment(nodes, {"x": [1, 3, 12, 12]}, "y", weights)
    tiling = make_tiling(segment, [1, 4, 2, 3])
    assert {n.op_type for n in tile_model(segment, tiling, tiling.tiles[0]).graph.node} == {
        "Identity", "Conv"}
    _assert_exact(executor, segment, tiling)


def test_two_outputs_are_tiled_each_on_its_own(executor: DeterministicExecutor) -> None:
    """Outputs c and Transpose(c): the tiles of c, then those of y; a window of rows of y reads
    columns of x."""
    nodes = [helper.make_node("Relu", ["x"], ["c"]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1])]
    segment = _segment(nodes, {"x": [1, 6, 6]}, ["c", "y"])
    tiling = make_tiling(segment, [1, 2, 6])
    assert [t.output_index for t in tiling.tiles] == [0] * 3 + [1] * 3
    assert tiling.blocks == ((1, 2, 6), (1, 2, 6))
    assert tiling.tiles[0].inputs == (((0, 1), (0, 2), (0, 6)),)
    assert tiling.tiles[3].inputs == (((0, 1), (0, 6), (0, 2)),)
    _assert_exact(executor, segment, tiling)
    assert tiling.to_json()["blocks"] == [[1, 2, 6], [1, 2, 6]]
    assert make_tiling(segment, [[1, 2, 6], [1, 2, 6]]) == tiling


def test_outputs_of_different_shapes_and_a_passthrough(executor: DeterministicExecutor) -> None:
    """A residual passed straight through, a row sum and a tensor of another shape: each
    output has its blocks and its tiles read only the inputs their windows depend on."""
    nodes = [helper.make_node("Relu", ["x"], ["c"]),
             helper.make_node("ReduceSum", ["c", "axes"], ["y"], keepdims=1),
             helper.make_node("Identity", ["r"], ["r_out"])]
    segment = _segment(nodes, {"x": [1, 6, 4], "r": [1, 6, 8]}, ["r_out", "c", "y"],
                       {"axes": np.array([2], np.int64)})
    tiling = plan_tiling(segment, 41 * 20 + 4)
    assert [len(b) for b in tiling.output_blocks] == [3, 3, 3]
    by_output = {t.output_index: t for t in tiling.tiles}
    assert by_output[0].input_indices == (1,) and by_output[1].input_indices == (0,)
    assert tiling.output_blocks[2][2] == 1 and tiling.tile_rows <= 41 * 20 + 4
    _assert_exact(executor, segment, tiling)
    record = tiling.to_json()
    assert record["inputs"] == [[1], [0], [0]]
    again = make_tiling(segment, record["blocks"])  # type: ignore[arg-type]
    assert again == tiling


# --- matrix products and row-wise operators ------------------------------------------------


def test_gemm_with_bias_and_relu(executor: DeterministicExecutor) -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["y"])]
    weights = {"w": _weights([12, 16]), "b": _weights([12], seed=2)}
    segment = _segment(nodes, {"x": [6, 16]}, "y", weights)
    tiling = plan_tiling(segment, _whole_rows(segment) // 2)
    assert tiling.split_axes
    _assert_exact(executor, segment, tiling)
    _assert_exact(executor, segment, make_tiling(segment, [4, 5]))


def test_matmul_on_tokens(executor: DeterministicExecutor) -> None:
    """x[1, T, K] @ W[K, N] + bias, GELU (erf form): rows and column blocks."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["y"]),
    ]
    weights = {"w": _weights([32, 24]), "b": _weights([24], seed=2),
               "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32)}
    segment = _segment(nodes, {"x": [1, 10, 32]}, "y", weights)
    tiling = plan_tiling(segment, make_tiling(segment, [1, 5, 24]).tile_rows)
    assert tiling.grid[1] > 1
    _assert_exact(executor, segment, tiling)
    _assert_exact(executor, segment, make_tiling(segment, [1, 3, 7]))


def test_elementwise_chain(executor: DeterministicExecutor) -> None:
    nodes = [helper.make_node("Mul", ["x", "k"], ["a"]),
             helper.make_node("Add", ["a", "bias"], ["b"]),
             helper.make_node("Tanh", ["b"], ["y"])]
    weights = {"k": np.array(0.5, np.float32), "bias": _weights([7])}
    segment = _segment(nodes, {"x": [2, 5, 7]}, "y", weights)
    tiling = plan_tiling(segment, make_tiling(segment, [1, 1, 7]).tile_rows)
    assert len(tiling.tiles) >= 7
    _assert_exact(executor, segment, tiling)


def test_softmax_keeps_last_axis_whole(executor: DeterministicExecutor) -> None:
    segment = _segment([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                       {"x": [1, 6, 10]}, "y")
    guarded = (10 * 10 + 49 * 10 + 40 * 3.4 * 10) // 2  # a row's cells: more than its hashing
    tiling = plan_tiling(segment, int(guarded))
    assert tiling.blocks == (1, 1, 10) and len(tiling.tiles) == 6
    _assert_exact(executor, segment, tiling)
    with pytest.raises(UnprovableModel, match="Softmax"):
        make_tiling(segment, [1, 6, 5])
    with pytest.raises(UnprovableModel, match=r"needs 975 \(it hashes 20 elements\); smaller "
                                              r"blocks: Softmax"):
        plan_tiling(segment, int(guarded) - 1)


def test_layer_normalization(executor: DeterministicExecutor) -> None:
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)]
    weights = {"scale": _weights([16]), "bias": _weights([16], seed=2)}
    segment = _segment(nodes, {"x": [1, 6, 16]}, "y", weights)
    tiling = plan_tiling(segment, 41 * 64 + 4)
    assert tiling.blocks == (1, 2, 16)
    _assert_exact(executor, segment, tiling)


def test_reduce_mean_and_transpose(executor: DeterministicExecutor) -> None:
    """Rows of 16 floats: ONNX Runtime's reductions (Eigen) sum a row in an order that depends
    on its address modulo 64 bytes, so rows of other lengths match only to a few ULP."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("ReduceMean", ["t", "axes"], ["y"], keepdims=1)]
    segment = _segment(nodes, {"x": [1, 16, 5]}, "y", {"axes": np.array([2], np.int64)},
                       opset=18)
    tiling = make_tiling(segment, [1, 2, 1])
    assert tiling.input_shapes == ((1, 16, 2),)
    _assert_exact(executor, segment, tiling)


# --- refusals and the plan -----------------------------------------------------------------


def test_reshape_mixing_axes_is_refused() -> None:
    """[4, 6] to [3, 8] neither merges nor splits axes: only whole blocks."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    segment = _segment(nodes, {"x": [1, 4, 6]}, "y", {"shape": np.array([1, 3, 8], np.int64)})
    with pytest.raises(UnprovableModel, match=r"smaller blocks: Reshape .* mixes axes"):
        plan_tiling(segment, 500)
    with pytest.raises(UnprovableModel, match=r"Reshape .* mixes axes"):
        make_tiling(segment, [1, 1, 8])


def test_an_operator_without_a_rule_is_refused_with_the_cut_that_isolates_it() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Gather", ["r", "idx"], ["y"], axis=2)]
    segment = _segment(nodes, {"x": [1, 4, 6]}, "y", {"idx": np.array([0, 2, 1], np.int64)})
    with pytest.raises(UnprovableModel, match=r"Gather 'y' has no tiling rule; cut the model "
                       r"right before and after it \(node positions 1 and 2: --cuts 1,2 "):
        plan_tiling(segment, 10)


def test_padding_of_a_computed_tensor_is_refused() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    segment = _segment(nodes, {"x": [1, 2, 6, 6]}, "y", {"w": _weights([2, 2, 3, 3])})
    with pytest.raises(UnprovableModel, match="only the segment's inputs can be padded"):
        plan_tiling(segment, 10)


def test_bound_is_respected_and_shrinking_it_adds_tiles() -> None:
    segment = _conv(3, 8, 16, after=["Relu"])
    counts = []
    whole = _whole_rows(segment)
    for bound in (whole, whole // 2, whole // 4, whole // 8, whole // 16):
        tiling = plan_tiling(segment, bound)
        assert tiling.tile_rows <= bound
        assert len({tuple(t.windows[0][a][1] - t.windows[0][a][0] for a in range(4))
                    for t in tiling.tiles}) == 1
        counts.append(len(tiling.tiles))
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_tile_adjudication_graph(executor: DeterministicExecutor) -> None:
    """A tile, as a segment, makes an adjudication graph: 0 on the honest slice."""
    segment = _conv(3, 4, 8, stride=2, after=["Relu"])
    tiling = make_tiling(segment, [1, 4, 2, 2])
    state = _state(segment)
    whole = run_segment(executor, segment, state)
    tile = tiling.tiles[-1]
    graph = serialize(adjudication_model(tile_segment(segment, tiling, tile)))
    feeds = [*cut_input(tiling, tile, state), *cut_output(tiling, tile, whole)]
    names = [f"x{j}" for j in range(len(segment.inputs))] + ["y0"]
    assert executor.run(graph, dict(zip(names, feeds, strict=True)))[0].tolist() == [0.0]


# --- property: random conv geometry --------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    kernel: int
    stride: int
    pad: int
    dilation: int
    depthwise: bool
    size: int
    blocks: tuple[int, int, int]


GEOMETRIES = st.builds(
    _Geometry, kernel=st.integers(1, 5), stride=st.integers(1, 3), pad=st.integers(0, 2),
    dilation=st.integers(1, 2), depthwise=st.booleans(), size=st.integers(5, 11),
    blocks=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
)


@settings(max_examples=50, deadline=None)
@given(geo=GEOMETRIES)
def test_random_conv_geometry_reproduces_the_segment(executor: DeterministicExecutor,
                                                     geo: _Geometry) -> None:
    """Every tile of any conv geometry gives its window of the segment within float32 error:
    ONNX Runtime picks its kernels by shape (one-row and one-column kernels for blocks of 1,
    other groupings of the sum for some small blocks), so a tile is not always bit-exact; τ,
    calibrated on tiles, covers the difference (DESIGN.md "Registration" step 4). The named
    cases above are bit-exact."""
    if (geo.kernel - 1) * geo.dilation + 1 > geo.size + 2 * geo.pad:
        return  # no output
    channels = 4
    segment = _conv(channels, channels if geo.depthwise else 3, geo.size, kernel=geo.kernel,
                    stride=geo.stride, pad=geo.pad, dilation=geo.dilation,
                    group=channels if geo.depthwise else 1)
    shape = segment.outputs[0].shape
    tiling = make_tiling(segment, [1, *(min(b, d) for b, d in zip(geo.blocks, shape[1:],
                                                                    strict=True))])
    # Two float32 sums of K terms (|x| <= 2, |w| <= 1, and the bias) differ by at most
    # 2·K·u·(2K + 1).
    terms = (1 if geo.depthwise else channels) * geo.kernel**2 + 1
    _assert_exact(executor, segment, tiling, atol=2 * terms * 2**-24 * (2 * terms + 1))


def test_the_registration_report_says_what_tiling_could_do() -> None:
    """A segment over the proving budget that tiling did not save is refused with why: it
    cannot be tiled, or its tiles (from the first size tried) did not fit either."""
    from prover.report import tiling_outlook

    segment = _conv(3, 8, 16, after=["Relu"])
    outlook = tiling_outlook(segment, budget=2**30, max_logrows=20)
    match = re.fullmatch(r"nor did its tiles fit \(from (\d+) tiles of output block \[1, (\d+), "
                         r"(\d+), (\d+)\] planned for 2\^15 rows, down to 2\^12\)", outlook)
    assert match is not None, outlook
    assert int(match[1]) > 1
    assert tiling_outlook(segment, budget=1, max_logrows=20).startswith(
        "it cannot be tiled within the budget either: ")
    reshaping = _segment([helper.make_node("Relu", ["x"], ["r"]),
                          helper.make_node("Reshape", ["r", "shape"], ["y"])],
                         {"x": [1, 4, 6]}, "y", {"shape": np.array([1, 6, 4], np.int64)})
    assert "Reshape" in tiling_outlook(reshaping, budget=70 * 10**6, max_logrows=20)
