"""Tiling a GPT-2-shaped transformer: outputs of several shapes, heads merged and split by
Reshape, the fused QKV projection Split, attention per head and block of queries.

The fast tests run on the benchmark's own block definition (``refute/large_models.py``) at toy
size (1 layer, d 16, 2 heads of 8, 8 tokens, MLP 64), segmented as registration does; the slow
test plans every segment of ``bench_model("gpt2_small")`` under the budget-derived bound.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import pytest

from circuits.adjudication import adjudication_bytes
from prover.calibration import tile_structure
from refute.errors import UnprovableModel
from refute.executor import DeterministicExecutor
from refute.instances import check_binding, hash_states
from refute.leaves import state_leaf
from refute.loading import load_model
from refute.segmentation import Segment, Segmentation, run_segment, run_segments, segment_model
from refute.tiling import (
    Tiling,
    _block_candidates,
    _graph,
    cut_input,
    cut_output,
    make_tiling,
    place_output,
    plan_tiling,
    recorded_tiling,
    rows_bound,
    tile_at,
    tile_counts,
    tile_model,
    tile_segment,
    worst_tile,
)

TOKENS, DIM, HEADS = 8, 16, 2


def _export(tokens: int = TOKENS, dim: int = DIM, heads: int = HEADS, layers: int = 1) -> bytes:
    torch = pytest.importorskip("torch")
    from refute.large_models import gpt2_small_module

    torch.manual_seed(0)
    module = gpt2_small_module(layers=layers, dim=dim, heads=heads, tokens=tokens,
                               hidden=4 * dim).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, tokens, dim),), buffer, dynamo=False,
                          opset_version=17, do_constant_folding=True,
                          input_names=["embeddings"], output_names=["hidden"])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gpt2() -> Segmentation:
    return segment_model(load_model(_export()))


@pytest.fixture(scope="module")
def states(gpt2: Segmentation) -> list[list[np.ndarray]]:
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, TOKENS, DIM)).astype(np.float32)
    return [list(s) for s in run_segments(DeterministicExecutor(), gpt2, {"embeddings": x})]


def _find(gpt2: Segmentation, *ops: str) -> Segment:
    return next(s for s in gpt2.segments if all(op in s.op_types for op in ops))


def _check_tiles(executor: DeterministicExecutor, segment: Segment, tiling: Tiling,
                 before: Sequence[np.ndarray], after: Sequence[np.ndarray], *,
                 tiles: Sequence[int] | None = None) -> None:
    """Each tile model gives its window of the segment's output: bit for bit, or within a few
    ULP of the output's magnitude where ONNX Runtime runs a one-row product by another kernel;
    placing every tile (when all are checked) rebuilds the outputs exactly."""
    chosen = range(len(tiling.tiles)) if tiles is None else tiles
    rebuilt = [np.full_like(a, np.nan) for a in after]
    for t in chosen:
        tile = tiling.tiles[t]
        x = cut_input(tiling, tile, before)
        assert [a.shape for a in x] == list(tile.input_shapes)
        got = run_segment(executor, tile_segment(segment, tiling, tile), x)
        expected = cut_output(tiling, tile, after)
        assert got[0].shape == expected[0].shape == tile.output_shape
        if got[0].tobytes() != expected[0].tobytes():
            scale = float(np.abs(after[tile.output_index]).max())
            np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=8 * scale * 2**-23,
                                       err_msg=f"segment {segment.index} tile {t}")
        place_output(tiling, tile, expected, rebuilt)
    if tiles is None:
        for r, a in zip(rebuilt, after, strict=True):
            assert r.tobytes() == a.tobytes()


def test_every_segment_tiles_and_reproduces_its_outputs(
        gpt2: Segmentation, states: list[list[np.ndarray]],
        executor: DeterministicExecutor) -> None:
    assert len(gpt2.segments) >= 6
    for segment in gpt2.segments:
        whole = make_tiling(segment, [list(o.shape) for o in segment.outputs])
        assert len(whole.tiles) == len(segment.outputs)
        tiling = plan_tiling(segment, whole.tile_rows // 4)
        assert len(tiling.tiles) > len(segment.outputs)
        assert tiling.tile_rows <= whole.tile_rows // 4
        _check_tiles(executor, segment, tiling, states[segment.index - 1],
                     states[segment.index])


def test_attention_scores_tile_per_head_query_and_key_block(
        gpt2: Segmentation, states: list[list[np.ndarray]],
        executor: DeterministicExecutor) -> None:
    """Q·Kᵀ, scale, mask (the Softmax starts the next segment): a tile is one head's block of
    queries against a block of keys; it reads that block of Q and of Kᵀ, not the residual nor
    V."""
    segment = next(s for s in gpt2.segments if s.op_types == ("MatMul", "Mul", "Add"))
    shapes = [o.shape for o in segment.outputs]
    scores = len(shapes) - 1
    assert shapes[scores] == (1, HEADS, TOKENS, TOKENS)
    blocks = [list(s) for s in shapes]
    blocks[scores] = [1, 1, 4, 4]
    tiling = make_tiling(segment, blocks)
    tile = tiling.tiles[tiling.first_tiles[scores] + 5]  # head 1, queries 0..4, keys 4..8
    assert tile.windows[0] == ((0, 1), (1, 2), (0, 4), (4, 8))
    assert tile.input_indices == (2, 3)  # Q and Kᵀ, split into heads
    assert tile.inputs == (((0, 1), (1, 2), (0, 4), (0, DIM // HEADS)),
                           ((0, 1), (1, 2), (0, DIM // HEADS), (4, 8)))
    _check_tiles(executor, segment, tiling, states[segment.index - 1], states[segment.index])


def test_softmax_and_values_tile_per_query_block_within_a_head(
        gpt2: Segmentation, states: list[list[np.ndarray]],
        executor: DeterministicExecutor) -> None:
    """Softmax, attn·V, heads merged: a tile is a block of queries and of columns within one
    head; it reads those queries' rows of that head's scores (the Softmax over every key) and
    that head's columns of V."""
    segment = _find(gpt2, "Softmax")
    assert segment.op_types[0] == "Softmax"
    out = len(segment.outputs) - 1
    blocks = [list(o.shape) for o in segment.outputs]
    blocks[out] = [1, 4, 4]
    tiling = make_tiling(segment, blocks)
    tile = tiling.tiles[tiling.first_tiles[out] + 3]  # queries 0..4, columns 12..16 (head 1)
    assert tile.windows[0] == ((0, 1), (0, 4), (12, 16))
    assert tile.inputs == (((0, 1), (0, TOKENS), (12, 16)),
                           ((0, 1), (1, 2), (0, 4), (0, TOKENS)))
    _check_tiles(executor, segment, tiling, states[segment.index - 1], states[segment.index])


def test_head_merge_takes_whole_heads_or_one_head(gpt2: Segmentation) -> None:
    """attn·V, Transpose, Reshape [1, T, H, D] → [1, T, H·D]: a column block is whole heads or
    stays within one; the planner offers no other."""
    segment = _find(gpt2, "Softmax")
    merged = len(segment.outputs) - 1
    assert segment.outputs[merged].shape == (1, TOKENS, DIM)
    g = _graph(segment)
    assert _block_candidates(g, merged, 2) == [16, 8, 4, 2, 1]
    blocks = [list(o.shape) for o in segment.outputs]
    blocks[merged] = [1, TOKENS, 6]
    with pytest.raises(UnprovableModel, match=r"Reshape .* mixes axes .* not aligned"):
        make_tiling(segment, blocks)


def test_split_of_the_fused_projection(gpt2: Segmentation) -> None:
    """LayerNorm, QKV MatMul, Split: a tile of V reads whole rows of the input and multiplies
    by its block of V's columns only (offset by 2·d in the fused weight)."""
    segment = _find(gpt2, "Split")
    v = next(k for k, o in enumerate(segment.outputs)
             if o.shape == (1, TOKENS, DIM) and not o.name.endswith("embeddings"))
    blocks = [list(o.shape) for o in segment.outputs]
    blocks[v] = [1, 4, 8]
    tiling = make_tiling(segment, blocks)
    tile = tiling.tiles[tiling.first_tiles[v] + 1]  # tokens 0..4, columns 8..16
    model = tile_model(segment, tiling, tile)
    weights = {t.name: t for t in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert list(weights[matmul.input[1]].dims) == [DIM, 8]
    full = onnx.load_model_from_string(segment.onnx_bytes)
    fused = next(onnx.numpy_helper.to_array(t) for t in full.graph.initializer
                 if t.name == next(n for n in full.graph.node
                                   if n.op_type == "MatMul").input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weights[matmul.input[1]]),
                                  fused[:, 2 * DIM + 8: 2 * DIM + 16])
    assert tile.input_indices == (0,) and tile.inputs == (((0, 1), (0, 4), (0, DIM)),)


def test_a_passthrough_output_is_an_identity_tile(gpt2: Segmentation) -> None:
    segment = _find(gpt2, "Softmax")
    tiling = plan_tiling(segment, rows_bound(12))
    tile = tiling.tiles[0]
    assert tile.output_index == 0 and tile.input_indices == (0,)
    ops = {n.op_type for n in tile_model(segment, tiling, tile).graph.node}
    assert ops <= {"Identity", "Slice"}


def test_worst_tile_names_the_output_that_lies(
        gpt2: Segmentation, states: list[list[np.ndarray]]) -> None:
    segment = next(s for s in gpt2.segments if s.op_types == ("MatMul", "Mul", "Add"))
    tiling = plan_tiling(segment, rows_bound(12))
    honest = states[segment.index]
    claimed = [a.copy() for a in honest]
    last = len(claimed) - 1
    claimed[last][0, 1, 5, 3] += 1.0
    tile = worst_tile(tiling, honest, claimed)
    assert tile.output_index == last
    assert tile == tile_at(tiling, [0, 1, 5, 3], last)
    assert all(a <= p < b for p, (a, b) in zip([0, 1, 5, 3], tile.outputs[0], strict=True))


def test_the_manifest_record_rebuilds_the_tiling(gpt2: Segmentation) -> None:
    segment = _find(gpt2, "Split")
    tiling = plan_tiling(segment, rows_bound(12))
    record = tiling.to_json()
    assert record["blocks"] == [list(b) for b in tiling.output_blocks]
    assert record["output_shapes"] == [list(o.shape) for o in segment.outputs]
    assert recorded_tiling({"tiling": record}, segment) == tiling
    circuits = [{"kind": "step", "segment": segment.index, "tiling": record}]
    counts = tile_counts(circuits, gpt2.segments)
    assert counts[segment.index - 1] == len(tiling.tiles)
    assert sum(counts) == len(tiling.tiles) + len(gpt2.segments) - 1


def test_binding_of_a_tile_takes_the_tensors_it_reads(
        gpt2: Segmentation, states: list[list[np.ndarray]]) -> None:
    """A tile reading two of four tensors of state i-1 and computing one of three of state i
    is bound by Poseidon of exactly those slices."""
    segment = _find(gpt2, "Softmax")
    i = segment.index
    tiling = plan_tiling(segment, rows_bound(12))
    tile = tiling.tiles[-1]
    assert len(tile.input_indices) < len(segment.inputs)
    scale = 7
    before, after = cut_input(tiling, tile, states[i - 1]), cut_output(tiling, tile, states[i])
    specs = [gpt2.states[i - 1], gpt2.states[i]]
    taken = [[specs[0][j] for j in tile.input_indices], [specs[1][tile.output_index]]]
    instances = [h for hs in hash_states([before, after], scale, specs=taken) for h in hs]
    leaves = [b"" for _ in gpt2.states]
    leaves[i - 1], leaves[i] = state_leaf(states[i - 1]), state_leaf(states[i])
    check_binding(scale=scale, specs=gpt2.states, indices=[i - 1, i],
                  states=[states[i - 1], states[i]], leaves=leaves, instances=instances,
                  tile=(tiling, tile))


# --- the full-size model -------------------------------------------------------------------


@pytest.mark.slow
def test_the_blocks_of_a_transformer_have_tiles_of_one_structure() -> None:
    """Calibration searches EZKL settings once per tile structure (prover.calibration's
    ``known``): block 2's tiles are block 1's apart from names and weights; the segments of a
    block differ from each other."""
    two = segment_model(load_model(_export(layers=2)))
    per_block = len(two.segments) // 2
    assert per_block == 6

    def structures(segment: Segment, blocks: Sequence[Sequence[int]] | Sequence[int]
                   ) -> tuple[set[str], set[bytes]]:
        tiling = make_tiling(segment, blocks)
        graphs = [adjudication_bytes(tile_segment(segment, tiling, t)) for t in tiling.tiles]
        return {tile_structure(g) for g in graphs}, set(graphs)

    seen: list[set[str]] = []
    for k in range(per_block):
        first, second = two.segments[k], two.segments[k + per_block]
        blocks = plan_tiling(first, rows_bound(12)).blocks
        (a, graphs_a), (b, graphs_b) = structures(first, blocks), structures(second, blocks)
        assert a == b, first.op_types
        assert not graphs_a & graphs_b  # the weights differ
        assert a not in seen, first.op_types  # (an identity tile of a passthrough may recur)
        seen.append(a)


def test_gpt2_small_every_segment_tiles_under_the_budget(
        executor: DeterministicExecutor) -> None:
    """Every segment of the GPT-2-small-shaped benchmark model plans a tiling under the bound
    :func:`prover.calibration.tile_to_budget` starts from (2^18 rows: 8 GiB), and its first,
    middle and last tiles of each output reproduce the segment."""
    from bench.bench_commitment import RAISED_LIMITS
    from bench.bench_models import bench_model

    loaded = load_model(bench_model("gpt2_small").onnx_bytes, limits=RAISED_LIMITS)
    segmentation = segment_model(loaded)
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, 128, 768)).astype(np.float32)
    states = run_segments(executor, segmentation, {"embeddings": x})
    bound = rows_bound(18)
    seen: dict[tuple[str, ...], object] = {}
    for segment in segmentation.segments:
        tiling = plan_tiling(segment, bound)
        assert tiling.tile_rows <= bound
        if segment.op_types in seen and segment.index > 12:
            continue  # the blocks repeat; check the first two layers' tiles
        seen[segment.op_types] = tiling.blocks
        picks = sorted({first + k for first, grid in zip(tiling.first_tiles, tiling.grids,
                                                          strict=True)
                        for k in (0, int(np.prod(grid)) // 2, int(np.prod(grid)) - 1)})
        _check_tiles(executor, segment, tiling, states[segment.index - 1],
                     states[segment.index], tiles=picks)
