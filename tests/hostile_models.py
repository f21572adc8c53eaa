"""A corpus of hostile ONNX models, built in memory, for the safe loader's tests.

Every builder returns the serialized bytes of one model (or of something pretending to be one).
Each hostile model is a small valid model with, as far as possible, exactly one defect, so that
the error the loader must raise is unambiguous under the loading contract
(:mod:`refute.loading`):

* :data:`HOSTILE` lists ``(case id, builder, expected error class, load_model kwargs)``;
* :data:`ALSO_ACCEPTED` lists, for the few cases where the contract allows it, other error
  classes that are accepted as well (e.g. a tensor whose declared size is huge *and* whose
  payload is missing may be refused as too large or as undecodable);
* :data:`EXTERNAL_CASES` names the cases that refer to external files, with the locations they
  refer to (the tests plant real files there and check the loader never opens them).

Nothing here touches the file system.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import (
    AttributeProto,
    FunctionProto,
    GraphProto,
    ModelProto,
    NodeProto,
    SparseTensorProto,
    TensorProto,
    ValueInfoProto,
    helper,
    numpy_helper,
)

from refute.errors import (
    ExternalDataRefused,
    InvalidGraph,
    ModelDecodeError,
    ModelRejected,
    ModelTooLarge,
    ShapeError,
    UnsupportedOperator,
    UnsupportedOpset,
)
from refute.loading import LoadLimits

FLOAT = TensorProto.FLOAT

#: Opset of the valid base model (within the supported range [9, 18]).
BASE_OPSET = 13

#: The valid base model's input and output names and shapes.
INPUT_NAME = "input"
OUTPUT_NAME = "output"
INPUT_SHAPE = (1, 3)
OUTPUT_SHAPE = (1, 4)

#: Locations referred to by the external-data cases (relative ones resolve next to the model).
SECRET_REL = "../secret.bin"
SECRET_ABS = "/etc/passwd"
WEIGHTS_REL = "weights.bin"

Builder = Callable[[], bytes]
Case = tuple[str, Builder, type[ModelRejected], dict[str, Any]]


# --- building blocks -----------------------------------------------------------------------


def _weights() -> np.ndarray[Any, np.dtype[np.float32]]:
    return (np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0) / 10.0


def _bias() -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.arange(4, dtype=np.float32) / 10.0


def _w() -> TensorProto:
    """The Gemm weight ``W`` [4, 3] as an initializer with ``raw_data`` (48 bytes)."""
    return numpy_helper.from_array(_weights(), "W")


def _b() -> TensorProto:
    """The Gemm bias ``B`` [4] as an initializer with ``raw_data`` (16 bytes)."""
    return numpy_helper.from_array(_bias(), "B")


def _vi(name: str, shape: Sequence[int | str | None] | None, elem: int = FLOAT) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _opset(version: int, domain: str = "") -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(domain, version)


def _ir_version_for(opset: int) -> int:
    if 1 <= opset <= 18:
        # At least IR 4: below it, initializers must also be graph inputs (a second defect).
        return max(4, int(helper.find_min_ir_version_for([_opset(opset)])))
    return 10  # opsets the onnx package does not know: any recent IR version


def _model(
    nodes: Sequence[NodeProto],
    inputs: Sequence[ValueInfoProto],
    outputs: Sequence[ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    *,
    opset: int | None = BASE_OPSET,
    extra_opsets: Sequence[onnx.OperatorSetIdProto] = (),
    functions: Sequence[FunctionProto] = (),
    sparse: Sequence[SparseTensorProto] = (),
    value_info: Sequence[ValueInfoProto] = (),
    ir_version: int | None = None,
) -> ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "hostile",
        list(inputs),
        list(outputs),
        initializer=list(initializers),
        value_info=list(value_info),
        sparse_initializer=list(sparse),
    )
    opsets = ([] if opset is None else [_opset(opset)]) + list(extra_opsets)
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        functions=list(functions),
        producer_name="refute-hostile-corpus",
    )
    if ir_version is None:
        ir_version = _ir_version_for(BASE_OPSET if opset is None else opset)
    model.ir_version = ir_version
    return model


def _gemm_relu(
    *,
    batch: int | str | None = 1,
    opset: int | None = BASE_OPSET,
    w: TensorProto | None = None,
    b: TensorProto | None = None,
) -> ModelProto:
    """``output = Relu(Gemm(input, W, B, transB=1))``: input [batch, 3], output [batch, 4]."""
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], name="gemm", transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME], name="relu"),
    ]
    return _model(
        nodes,
        [_vi(INPUT_NAME, [batch, INPUT_SHAPE[1]])],
        [_vi(OUTPUT_NAME, [batch, OUTPUT_SHAPE[1]])],
        [_w() if w is None else w, _b() if b is None else b],
        opset=opset,
    )


def valid_model_proto(*, batch: int | str = 1, opset: int = BASE_OPSET) -> ModelProto:
    """A small valid Gemm+Relu model; ``batch`` may be a ``dim_param`` name."""
    return _gemm_relu(batch=batch, opset=opset)


def valid_model_bytes() -> bytes:
    """The valid static model: input ``input`` [1, 3] float32, output ``output`` [1, 4]."""
    return bytes(valid_model_proto().SerializeToString())


def dynamic_model_bytes() -> bytes:
    """The valid model with a symbolic batch dimension ``batch_size``."""
    return bytes(valid_model_proto(batch="batch_size").SerializeToString())


def _constant_model(value: TensorProto) -> ModelProto:
    """``output = Relu(Gemm(input, Constant(value), B))``: the weight comes from a Constant."""
    nodes = [
        helper.make_node("Constant", [], ["Wc"], name="const", value=value),
        helper.make_node("Gemm", [INPUT_NAME, "Wc", "B"], ["h"], name="gemm", transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME], name="relu"),
    ]
    return _model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [_b()])


def _broadcast_mul(big: TensorProto, out_shape: Sequence[int]) -> ModelProto:
    """``output = Mul(input [1, 1], big)``: shapes are consistent whatever ``big``'s dims."""
    nodes = [helper.make_node("Mul", [INPUT_NAME, big.name], [OUTPUT_NAME], name="mul")]
    return _model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, out_shape)], [big])


def _claiming(dims: Sequence[int], raw: bytes | None = None, name: str = "big") -> TensorProto:
    """A float32 tensor whose ``dims`` claim a size the payload does not have."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = FLOAT
    tensor.dims.extend(dims)
    if raw is not None:
        tensor.raw_data = raw
    return tensor


def _external(tensor: TensorProto, location: str | None, *, length: int = 48) -> TensorProto:
    """Mark ``tensor`` as stored externally at ``location`` (no entries if ``None``)."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    if location is not None:
        for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = value
    return tensor


def _serialize(model: ModelProto) -> bytes:
    return bytes(model.SerializeToString())


# --- raw protobuf encoding -----------------------------------------------------------------

_VARINT = 0
_LEN = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, _LEN) + _varint(len(payload)) + payload


def _varint_field(field_number: int, value: int) -> bytes:
    return _key(field_number, _VARINT) + _varint(value)


def _model_header(opset: int = BASE_OPSET) -> bytes:
    """ModelProto fields ``ir_version`` (1) and ``opset_import`` (8), without a graph."""
    header = ModelProto()
    header.ir_version = _ir_version_for(opset)
    header.opset_import.append(_opset(opset))
    return bytes(header.SerializeToString())


# --- external data (ExternalDataRefused) ---------------------------------------------------


def ext_data_dotdot() -> bytes:
    """W lives in ``../secret.bin``: a path escaping the model's directory."""
    return _serialize(_gemm_relu(w=_external(_w(), SECRET_REL)))


def ext_data_absolute() -> bytes:
    """W lives in ``/etc/passwd``: an absolute path."""
    return _serialize(_gemm_relu(w=_external(_w(), SECRET_ABS)))


def ext_data_plain() -> bytes:
    """W lives in ``weights.bin`` next to the model: still refused."""
    return _serialize(_gemm_relu(w=_external(_w(), WEIGHTS_REL)))


def ext_data_location_without_entries() -> bytes:
    """``data_location = EXTERNAL`` with no ``external_data`` entries at all."""
    return _serialize(_gemm_relu(w=_external(_w(), None)))


def ext_data_entries_default_location() -> bytes:
    """``external_data`` entries on a tensor whose ``data_location`` is DEFAULT (and has data)."""
    w = _w()
    entry = w.external_data.add()
    entry.key = "location"
    entry.value = WEIGHTS_REL
    return _serialize(_gemm_relu(w=w))


def ext_data_bias() -> bytes:
    """Only the bias B is external (W is inline): every initializer must be checked."""
    return _serialize(_gemm_relu(b=_external(_b(), SECRET_REL, length=16)))


def ext_data_in_constant() -> bytes:
    """A Constant node's ``value`` attribute tensor is external (``weights.bin``)."""
    return _serialize(_constant_model(_external(numpy_helper.from_array(_weights()), WEIGHTS_REL)))


def ext_data_in_subgraph() -> bytes:
    """An initializer inside an If branch is external (``../secret.bin``)."""
    secret = _external(numpy_helper.from_array(np.zeros((1, 3), np.float32), "S"), SECRET_REL)
    then_branch = helper.make_graph(
        [helper.make_node("Add", [INPUT_NAME, "S"], ["t_out"])],
        "then",
        [],
        [_vi("t_out", [1, 3])],
        initializer=[secret],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Relu", [INPUT_NAME], ["e_out"])], "else", [], [_vi("e_out", [1, 3])]
    )
    node = helper.make_node(
        "If", ["cond"], [OUTPUT_NAME], then_branch=then_branch, else_branch=else_branch
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    return _serialize(_model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])], [cond]))


# --- sizes (ModelTooLarge) -----------------------------------------------------------------


def claims_2gb_float() -> bytes:
    """An initializer with dims [2**29] float32 (2 GiB) and no data at all."""
    return _serialize(_broadcast_mul(_claiming([2**29]), [1, 2**29]))


def claims_2gb_tiny_raw() -> bytes:
    """An initializer with dims [2**29] float32 (2 GiB) and 16 bytes of ``raw_data``."""
    return _serialize(_broadcast_mul(_claiming([2**29], b"\x00" * 16), [1, 2**29]))


def claims_2pow40_elements() -> bytes:
    """An initializer with dims [2**20, 2**20]: 2**40 elements, no data."""
    return _serialize(_broadcast_mul(_claiming([2**20, 2**20]), [2**20, 2**20]))


def claims_int64_overflow() -> bytes:
    """Dims [2**32, 2**32]: the element count 2**64 wraps to 0 in int64 arithmetic."""
    return _serialize(_broadcast_mul(_claiming([2**32, 2**32], b""), [2**32, 2**32]))


def constant_claims_2gb() -> bytes:
    """A Constant node's value tensor with dims [2**29] float32 and no data."""
    nodes = [
        helper.make_node("Constant", [], ["big"], name="const", value=_claiming([2**29])),
        helper.make_node("Mul", [INPUT_NAME, "big"], [OUTPUT_NAME], name="mul"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, [1, 2**29])]))


def intermediate_conv_pads() -> bytes:
    """Conv on a 1x1 image with pads of 100000: the output is [1, 1, 200001, 200001]."""
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "K"], [OUTPUT_NAME], name="conv", pads=[100_000] * 4)
    ]
    kernel = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "K")
    return _serialize(
        _model(
            nodes,
            [_vi(INPUT_NAME, [1, 1, 1, 1])],
            [_vi(OUTPUT_NAME, [1, 1, 200_001, 200_001])],
            [kernel],
        )
    )


def intermediate_broadcast() -> bytes:
    """Add([8192, 1], [1, 8192]) broadcasts to 2**26 elements from 32 KiB of weights."""
    row = numpy_helper.from_array(np.ones((1, 8192), np.float32), "row")
    nodes = [helper.make_node("Add", [INPUT_NAME, "row"], [OUTPUT_NAME], name="add")]
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [8192, 1])], [_vi(OUTPUT_NAME, [8192, 8192])], [row])
    )


def _fold_bomb(side: int) -> bytes:
    """``output = Add(input [1, 1], Pad(constant [1, 1], pads))``, the Pad giving [side, side].

    Every input of the Pad is constant, so a loader that folds constants before bounding the
    inferred shapes materializes a ``side * side`` float32 tensor.
    """
    c = numpy_helper.from_array(np.ones((1, 1), np.float32), "c")
    pads = numpy_helper.from_array(np.array([0, 0, side - 1, side - 1], np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["c", "pads"], ["big"], name="pad"),
        helper.make_node("Add", [INPUT_NAME, "big"], [OUTPUT_NAME], name="add"),
    ]
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, [side, side])], [c, pads])
    )


def constant_fold_bomb() -> bytes:
    """A constant Pad whose result has 2**26 elements (256 MiB of float32) from 40 bytes."""
    return _fold_bomb(2**13)


def constant_fold_bomb_huge() -> bytes:
    """A constant Pad whose result has 2**40 elements (4 TiB of float32) from 40 bytes."""
    return _fold_bomb(2**20)


def intermediate_pad() -> bytes:
    """Pad of the input [1, 1] by pads [0, 0, 99999, 99999]: the output has ~10**10 elements."""
    pads = numpy_helper.from_array(np.array([0, 0, 99_999, 99_999], np.int64), "pads")
    nodes = [helper.make_node("Pad", [INPUT_NAME, "pads"], [OUTPUT_NAME], name="pad")]
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, [100_000, 100_000])], [pads])
    )


def negative_dims() -> bytes:
    """W claims dims [-4, -3]: the product (12) matches its 48 bytes, but dims are negative."""
    return _serialize(_gemm_relu(w=_claiming([-4, -3], _weights().tobytes(), "W")))


def five_nodes() -> bytes:
    """Gemm followed by four Relu: five nodes (refused with ``max_nodes=3``)."""
    nodes = [helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h0"], name="gemm", transB=1)]
    for i in range(1, 4):
        nodes.append(helper.make_node("Relu", [f"h{i - 1}"], [f"h{i}"], name=f"relu{i}"))
    nodes.append(helper.make_node("Relu", ["h3"], [OUTPUT_NAME], name="relu4"))
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [_w(), _b()])
    )


def many_nodes() -> bytes:
    """A chain of 5000 Relu nodes: over the default limit of 4096 nodes."""
    count = 5000
    nodes = [
        helper.make_node(
            "Relu",
            [INPUT_NAME if i == 0 else f"r{i}"],
            [OUTPUT_NAME if i == count - 1 else f"r{i + 1}"],
        )
        for i in range(count)
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])]))


def constant_weight_model() -> bytes:
    """Valid: the Gemm weight [4, 3] (48 bytes) is a Constant node, the bias B an initializer."""
    return _serialize(_constant_model(numpy_helper.from_array(_weights())))


# --- lying lengths (ModelDecodeError) ------------------------------------------------------


def raw_data_short() -> bytes:
    """W claims [4, 3] float32 (48 bytes) but ``raw_data`` has 40."""
    return _serialize(_gemm_relu(w=_claiming([4, 3], _weights().tobytes()[:40], "W")))


def raw_data_long() -> bytes:
    """W claims [4, 3] float32 (48 bytes) but ``raw_data`` has 52."""
    return _serialize(_gemm_relu(w=_claiming([4, 3], _weights().tobytes() + b"\0" * 4, "W")))


def float_data_short() -> bytes:
    """W claims [4, 3] (12 elements) but ``float_data`` has 11 values."""
    w = _claiming([4, 3], None, "W")
    w.float_data.extend(_weights().ravel()[:11].tolist())
    return _serialize(_gemm_relu(w=w))


def no_data_small() -> bytes:
    """W claims [4, 3] float32 and carries no data at all."""
    return _serialize(_gemm_relu(w=_claiming([4, 3], None, "W")))


def constant_raw_data_short() -> bytes:
    """A Constant's value claims [4, 3] float32 but ``raw_data`` has 20 bytes."""
    return _serialize(_constant_model(_claiming([4, 3], _weights().tobytes()[:20], "Wc")))


# --- broken protobuf (ModelDecodeError) ----------------------------------------------------


def _valid_cut(position: Callable[[bytes], int]) -> bytes:
    data = valid_model_bytes()
    return data[: position(data)]


def truncated_quarter() -> bytes:
    """The valid model cut at a quarter of its length."""
    return _valid_cut(lambda data: len(data) // 4)


def truncated_half() -> bytes:
    """The valid model cut at half its length."""
    return _valid_cut(lambda data: len(data) // 2)


def truncated_mid_initializer() -> bytes:
    """The valid model cut in the middle of W's raw bytes."""
    raw = _weights().tobytes()
    return _valid_cut(lambda data: data.index(raw) + len(raw) // 2)


def truncated_last_byte() -> bytes:
    """The valid model without its last byte."""
    return _valid_cut(lambda data: len(data) - 1)


def truncated_header() -> bytes:
    """The first 3 bytes of the valid model."""
    return _valid_cut(lambda data: 3)


def garbage() -> bytes:
    """4 KiB of deterministic pseudo-random bytes (that the protobuf parser rejects)."""
    out = bytearray()
    block = b"refute hostile garbage"
    while len(out) < 4096:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out)


def text_file() -> bytes:
    """A text file with a ``.onnx`` name."""
    return b"this is not an ONNX model, it is plain text\n" * 20


def empty() -> bytes:
    """Zero bytes (which protobuf happily parses as an empty ModelProto)."""
    return b""


def pickle_payload() -> bytes:
    """A (benign) pickle, as a PyTorch checkpoint would be: never unpickled, never accepted."""
    return pickle.dumps({"weights": [1.0, 2.0, 3.0], "note": "not an onnx model"}, protocol=4)


def wrong_kind_graph() -> bytes:
    """A valid serialized GraphProto (the valid model's graph), not a ModelProto."""
    return bytes(valid_model_proto().graph.SerializeToString())


def wrong_kind_tensor() -> bytes:
    """A valid serialized TensorProto, not a ModelProto."""
    return bytes(_w().SerializeToString())


def model_without_graph() -> bytes:
    """A ModelProto with an IR version and an opset but no graph at all."""
    return _model_header()


def pb_huge_length_graph() -> bytes:
    """The graph field's length prefix claims 2**62 bytes; a few bytes follow."""
    return _model_header() + _key(7, _LEN) + _varint(2**62) + b"\x0a\x00"


def pb_huge_length_raw_data() -> bytes:
    """W's ``raw_data`` length prefix claims 2**40 bytes (enclosing lengths are consistent)."""
    w = _claiming([4, 3], None, "W")
    w_bytes = w.SerializeToString() + _key(9, _LEN) + _varint(2**40) + _weights().tobytes()
    graph = valid_model_proto().graph
    graph.ClearField("initializer")
    graph_bytes = (
        graph.SerializeToString() + _len_field(5, _b().SerializeToString()) + _len_field(5, w_bytes)
    )
    return _model_header() + _len_field(7, graph_bytes)


def pb_deep_nesting() -> bytes:
    """2000 graphs nested through graph-valued attributes (a stack-exhaustion attempt)."""
    graph = b""
    for _ in range(2000):
        attribute = (
            _len_field(1, b"body") + _len_field(6, graph) + _varint_field(20, AttributeProto.GRAPH)
        )
        node = _len_field(4, b"Loop") + _len_field(5, attribute)
        graph = _len_field(1, node)
    return _model_header() + _len_field(7, graph)


# --- operators and constructs (UnsupportedOperator) ----------------------------------------


def unknown_op() -> bytes:
    """An operator that does not exist in the default domain."""
    nodes = [helper.make_node("EvilOp", [INPUT_NAME], [OUTPUT_NAME], name="evil")]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])]))


def custom_domain_op() -> bytes:
    """``Relu`` in domain ``com.evil`` (the domain is not imported)."""
    nodes = [helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME], domain="com.evil")]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])]))


def custom_domain_op_imported() -> bytes:
    """An op of domain ``com.evil``, with ``com.evil`` imported as an opset."""
    nodes = [helper.make_node("Backdoor", [INPUT_NAME], [OUTPUT_NAME], domain="com.evil")]
    return _serialize(
        _model(
            nodes,
            [_vi(INPUT_NAME, [1, 3])],
            [_vi(OUTPUT_NAME, [1, 3])],
            extra_opsets=[_opset(1, "com.evil")],
        )
    )


def _if_model(then_node: NodeProto, else_node: NodeProto) -> ModelProto:
    then_branch = helper.make_graph([then_node], "then", [], [_vi(then_node.output[0], [1, 3])])
    else_branch = helper.make_graph([else_node], "else", [], [_vi(else_node.output[0], [1, 3])])
    node = helper.make_node(
        "If", ["cond"], [OUTPUT_NAME], then_branch=then_branch, else_branch=else_branch
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    return _model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])], [cond])


def if_subgraph() -> bytes:
    """An If node whose branches are subgraphs."""
    return _serialize(
        _if_model(
            helper.make_node("Relu", [INPUT_NAME], ["t_out"]),
            helper.make_node("Sigmoid", [INPUT_NAME], ["e_out"]),
        )
    )


def loop_subgraph() -> bytes:
    """A Loop node (three iterations of Relu on a loop-carried value)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Relu", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            _vi("iter", [], TensorProto.INT64),
            _vi("cond_in", [], TensorProto.BOOL),
            _vi("v_in", [1, 3]),
        ],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [1, 3])],
    )
    # No (bool) condition input: the trip count M alone bounds the loop.
    node = helper.make_node("Loop", ["M", "", INPUT_NAME], [OUTPUT_NAME], body=body)
    m = numpy_helper.from_array(np.array(3, np.int64), "M")
    return _serialize(_model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])], [m]))


def scan_subgraph() -> bytes:
    """A Scan node accumulating the rows of the input."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
            helper.make_node("Relu", ["x_t"], ["y_t"]),
        ],
        "body",
        [_vi("s_in", [3]), _vi("x_t", [3])],
        [_vi("s_out", [3]), _vi("y_t", [3])],
    )
    node = helper.make_node(
        "Scan", ["s0", INPUT_NAME], ["s_final", OUTPUT_NAME], body=body, num_scan_inputs=1
    )
    s0 = numpy_helper.from_array(np.zeros(3, np.float32), "s0")
    return _serialize(_model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])], [s0]))


def _relu_graph(name: str) -> GraphProto:
    return helper.make_graph(
        [helper.make_node("Relu", ["g_in"], ["g_out"])],
        name,
        [_vi("g_in", [1, 3])],
        [_vi("g_out", [1, 3])],
    )


def graph_attribute_on_relu() -> bytes:
    """A plain Relu node smuggling a graph-valued attribute."""
    node = helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME], payload=_relu_graph("hidden"))
    return _serialize(_model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])]))


def graphs_attribute_on_relu() -> bytes:
    """A plain Relu node smuggling a list-of-graphs attribute (type GRAPHS)."""
    node = helper.make_node(
        "Relu", [INPUT_NAME], [OUTPUT_NAME], payload=[_relu_graph("g1"), _relu_graph("g2")]
    )
    return _serialize(_model([node], [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])]))


def _local_function() -> FunctionProto:
    return helper.make_function(
        "local.fn",
        "MyRelu",
        ["x"],
        ["y"],
        [helper.make_node("Relu", ["x"], ["y"])],
        [_opset(BASE_OPSET)],
    )


def local_function_unused() -> bytes:
    """The valid model plus a model-local function (never called, domain not imported)."""
    model = valid_model_proto()
    model.functions.append(_local_function())
    return _serialize(model)


def local_function_called() -> bytes:
    """A node calling a model-local function ``local.fn:MyRelu``."""
    nodes = [helper.make_node("MyRelu", [INPUT_NAME], [OUTPUT_NAME], domain="local.fn")]
    return _serialize(
        _model(
            nodes,
            [_vi(INPUT_NAME, [1, 3])],
            [_vi(OUTPUT_NAME, [1, 3])],
            extra_opsets=[_opset(1, "local.fn")],
            functions=[_local_function()],
        )
    )


def sparse_initializer() -> bytes:
    """W given as a sparse initializer (COO, all 12 values)."""
    values = numpy_helper.from_array(_weights().ravel(), "W")
    indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "W_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], name="gemm", transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME], name="relu"),
    ]
    return _serialize(
        _model(
            nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [_b()], sparse=[sparse]
        )
    )


def constant_sparse_value() -> bytes:
    """A Constant node whose value is a sparse tensor (attribute ``sparse_value``)."""
    values = numpy_helper.from_array(_weights().ravel(), "values")
    indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    node = helper.make_node("Constant", [], ["Wc"], name="const", sparse_value=sparse)
    model = onnx.ModelProto.FromString(constant_weight_model())
    model.graph.node[0].CopyFrom(node)
    return _serialize(model)


def _typed_input(elem: int) -> ModelProto:
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=FLOAT),
        helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
    ]
    return _model(nodes, [_vi(INPUT_NAME, [1, 3], elem)], [_vi(OUTPUT_NAME, [1, 4])], [_w(), _b()])


def string_input() -> bytes:
    """The graph input is a tensor of strings (cast to float inside)."""
    return _serialize(_typed_input(TensorProto.STRING))


def int64_input() -> bytes:
    """The graph input is an int64 tensor (cast to float inside)."""
    return _serialize(_typed_input(TensorProto.INT64))


def double_input_identity() -> bytes:
    """A float64 input passed straight to a float64 output through Relu."""
    nodes = [helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME])]
    return _serialize(
        _model(
            nodes,
            [_vi(INPUT_NAME, [1, 3], TensorProto.DOUBLE)],
            [_vi(OUTPUT_NAME, [1, 3], TensorProto.DOUBLE)],
        )
    )


# --- opsets (UnsupportedOpset) -------------------------------------------------------------


def opset_7() -> bytes:
    """The valid model at opset 7 (below the minimum of 9)."""
    return _serialize(_gemm_relu(opset=7))


def opset_8() -> bytes:
    """The valid model at opset 8 (just below the minimum)."""
    return _serialize(_gemm_relu(opset=8))


def opset_19() -> bytes:
    """The valid model at opset 19 (just above the maximum of 18)."""
    return _serialize(_gemm_relu(opset=19))


def opset_30() -> bytes:
    """The valid model at opset 30 (which does not exist)."""
    return _serialize(_gemm_relu(opset=30))


def opset_missing() -> bytes:
    """No opset import at all."""
    return _serialize(_gemm_relu(opset=None))


def opset_extra_unknown_domain() -> bytes:
    """The valid model plus an (unused) opset import of domain ``com.evil``."""
    model = valid_model_proto()
    model.opset_import.append(_opset(1, "com.evil"))
    return _serialize(model)


def opset_only_custom_domain() -> bytes:
    """Only ``com.evil`` is imported; the default domain, used by Gemm and Relu, is not."""
    model = valid_model_proto()
    del model.opset_import[:]
    model.opset_import.append(_opset(13, "com.evil"))
    return _serialize(model)


# --- shapes (ShapeError) -------------------------------------------------------------------


def missing_dim() -> bytes:
    """The input's feature dimension has neither ``dim_value`` nor ``dim_param`` (a missing
    leading dimension defaults to 1, as EZKL's batch does)."""
    model = valid_model_proto()
    model.graph.input[0].type.tensor_type.shape.dim[1].Clear()
    return _serialize(model)


def missing_shape() -> bytes:
    """The input has an element type but no shape at all."""
    model = valid_model_proto()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return _serialize(model)


def second_symbolic_dim() -> bytes:
    """Input [batch_size, features]: pinning only ``batch_size`` leaves ``features`` free."""
    model = valid_model_proto(batch="batch_size")
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "features"
    return _serialize(model)


def gemm_inner_mismatch() -> bytes:
    """Gemm of input [1, 3] with W [4, 5]: the inner dimensions disagree."""
    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "W")
    return _serialize(_gemm_relu(w=w))


def add_not_broadcastable() -> bytes:
    """Add of [1, 3] and [1, 4]: not broadcastable."""
    other = numpy_helper.from_array(np.ones((1, 4), np.float32), "other")
    nodes = [helper.make_node("Add", [INPUT_NAME, "other"], [OUTPUT_NAME])]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [other]))


def output_shape_mismatch() -> bytes:
    """The declared output shape [1, 7] contradicts the inferred [1, 4]."""
    model = valid_model_proto()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    return _serialize(model)


def value_info_mismatch() -> bytes:
    """A value_info entry claims Gemm's output is [1, 9] (it is [1, 4])."""
    model = valid_model_proto()
    model.graph.value_info.append(_vi("h", [1, 9]))
    return _serialize(model)


# --- graph structure (InvalidGraph) --------------------------------------------------------


def _structural(nodes: Sequence[NodeProto], *, outputs: Sequence[ValueInfoProto] = ()) -> bytes:
    return _serialize(
        _model(
            nodes,
            [_vi(INPUT_NAME, [1, 3])],
            list(outputs) or [_vi(OUTPUT_NAME, [1, 4])],
            [_w(), _b()],
        )
    )


def dangling_input() -> bytes:
    """Relu consumes ``ghost``, which nothing produces."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], transB=1),
            helper.make_node("Add", ["h", "ghost"], [OUTPUT_NAME]),
        ]
    )


def duplicate_output() -> bytes:
    """Two Gemm nodes both produce ``h``."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], name="g1", transB=1),
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], name="g2", transB=1),
            helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
        ]
    )


def output_never_produced() -> bytes:
    """A second graph output ``phantom`` that no node produces."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
        ],
        outputs=[_vi(OUTPUT_NAME, [1, 4]), _vi("phantom", [1, 4])],
    )


def cycle() -> bytes:
    """``a = Add(g, output)``, ``output = Relu(a)``: a two-node cycle."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["g"], transB=1),
            helper.make_node("Add", ["g", OUTPUT_NAME], ["a"]),
            helper.make_node("Relu", ["a"], [OUTPUT_NAME]),
        ]
    )


def self_loop() -> bytes:
    """``s = Add(g, s)``: a node consuming its own output."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["g"], transB=1),
            helper.make_node("Add", ["g", "s"], ["s"]),
            helper.make_node("Relu", ["s"], [OUTPUT_NAME]),
        ]
    )


def output_is_input() -> bytes:
    """The graph input ``input`` is also listed as a graph output."""
    return _structural(
        [
            helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
        ],
        outputs=[_vi(OUTPUT_NAME, [1, 4]), _vi(INPUT_NAME, [1, 3])],
    )


def node_overwrites_input() -> bytes:
    """A node writes to ``input``, the name of the graph input (with the input's shape)."""
    c = numpy_helper.from_array(np.ones((1, 3), np.float32), "c")
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
        helper.make_node("Sigmoid", ["c"], [INPUT_NAME]),
    ]
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [_w(), _b(), c])
    )


def node_overwrites_initializer() -> bytes:
    """A node writes to ``W``, which is also an initializer: two values for one name."""
    v = numpy_helper.from_array(_weights() + 1.0, "V")
    nodes = [
        helper.make_node("Sigmoid", ["V"], ["W"]),
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME]),
    ]
    return _serialize(
        _model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])], [_w(), _b(), v])
    )


def duplicate_initializer() -> bytes:
    """Two initializers named ``W`` with different values: which one runs is ambiguous."""
    other = numpy_helper.from_array(-_weights(), "W")
    model = valid_model_proto()
    model.graph.initializer.append(other)
    return _serialize(model)


def duplicate_input() -> bytes:
    """The graph input ``input`` is declared twice."""
    model = valid_model_proto()
    model.graph.input.append(_vi(INPUT_NAME, [1, 3]))
    return _serialize(model)


# --- weights and folding (issue 9: findings 7 and 9) -------------------------------------


def _with_weight_value(value: float, *, index: int = 5) -> bytes:
    """The valid model with one element of ``W`` replaced by ``value``."""
    weights = _weights()
    weights.flat[index] = np.float32(value)
    return _serialize(_gemm_relu(w=numpy_helper.from_array(weights, "W")))


def nan_weight() -> bytes:
    """``W`` holds a NaN: calibration would see NaN states (and register τ = 0)."""
    return _with_weight_value(float("nan"))


def inf_weight() -> bytes:
    """``W`` holds +inf."""
    return _with_weight_value(float("inf"))


def neg_inf_bias() -> bytes:
    """``B`` holds -inf (typed ``float_data``, not ``raw_data``)."""
    bias = helper.make_tensor("B", FLOAT, [4], [0.0, float("-inf"), 0.2, 0.3])
    return _serialize(_gemm_relu(b=bias))


def huge_weight() -> bytes:
    """``W`` holds 3e38: finite, but no fixed-point circuit can represent it."""
    return _with_weight_value(3e38)


def weight_below_circuit_bound() -> bytes:
    """``W`` holds 2**32 * 0.99: large, yet representable at every scale (a control)."""
    return _with_weight_value(2.0**32 * 0.99)


def weight_just_over_circuit_bound() -> bytes:
    """``W`` holds 2**32 * 1.01: just beyond ``LoadLimits.max_abs_value`` (2**32)."""
    return _with_weight_value(2.0**32 * 1.01)


def nan_in_constant_node() -> bytes:
    """The Gemm weight comes from a Constant node holding a NaN."""
    weights = _weights()
    weights[0, 0] = np.nan
    return _serialize(_constant_model(numpy_helper.from_array(weights, "Wc")))


def folded_inf() -> bytes:
    """``W = Div(W0, zeros)`` folds to infinities: refused after folding, naming the result."""
    nodes = [
        helper.make_node("Div", ["W0", "zeros"], ["W"], name="div"),
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], ["h"], name="gemm", transB=1),
        helper.make_node("Relu", ["h"], [OUTPUT_NAME], name="relu"),
    ]
    w0 = numpy_helper.from_array(_weights() + 1.0, "W0")
    zeros = numpy_helper.from_array(np.zeros((4, 3), np.float32), "zeros")
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 4])],
                             [w0, zeros, _b()]))


def constant_pads_chain(length: int = 8) -> bytes:
    """A constant [1, 1] padded to [4096, 4096] (64 MiB, within the per-tensor limit), then
    padded again by zero ``length - 1`` times: every result is a new 64 MiB constant (the
    reported 278-byte model that folded to 2.1 GB). ``output = Add(input, c)`` ignores them."""
    c = numpy_helper.from_array(np.ones((1, 1), np.float32), "c")
    grow = numpy_helper.from_array(np.array([0, 0, 4095, 4095], np.int64), "p")
    zero = numpy_helper.from_array(np.zeros(4, np.int64), "z")
    nodes = [helper.make_node("Pad", ["c", "p"], ["t0"])]
    nodes += [helper.make_node("Pad", [f"t{i - 1}", "z"], [f"t{i}"]) for i in range(1, length)]
    nodes.append(helper.make_node("Add", [INPUT_NAME, "c"], [OUTPUT_NAME]))
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, [1, 1])],
                             [c, grow, zero]))


def fold_matmul_bomb() -> bytes:
    """Two constant Pads to [4096, 4096] multiplied together: 2**36 multiply-accumulates (and
    gigabytes) of folding from a few hundred bytes."""
    c = numpy_helper.from_array(np.ones((1, 1), np.float32), "c")
    grow = numpy_helper.from_array(np.array([0, 0, 4095, 4095], np.int64), "p")
    nodes = [
        helper.make_node("Pad", ["c", "p"], ["a"], name="pad"),
        helper.make_node("MatMul", ["a", "a"], ["b"], name="square"),
        helper.make_node("ReduceSum", ["b"], ["r"], name="sum", keepdims=1),
        helper.make_node("Add", [INPUT_NAME, "r"], [OUTPUT_NAME], name="add"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1])], [_vi(OUTPUT_NAME, [1, 1])],
                             [c, grow]))


def fold_conv_bomb() -> bytes:
    """A constant Conv of a [256, 256] image by a [128, 128] kernel (both constant Pads, a
    few hundred bytes): 2**28 multiply-accumulates, and the reference evaluator's im2col takes
    gigabytes and tens of seconds."""
    c = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "c")
    image = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 255, 255], np.int64), "pi")
    kernel = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 127, 127], np.int64), "pk")
    nodes = [
        helper.make_node("Pad", ["c", "pi"], ["x"], name="image"),
        helper.make_node("Pad", ["c", "pk"], ["k"], name="kernel"),
        helper.make_node("Conv", ["x", "k"], ["y"], name="conv"),
        helper.make_node("ReduceSum", ["y"], ["r"], name="sum", keepdims=1),
        helper.make_node("Add", [INPUT_NAME, "r"], [OUTPUT_NAME], name="add"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1, 1, 1])],
                             [_vi(OUTPUT_NAME, [1, 1, 1, 1])], [c, image, kernel]))


def conv_compute_bomb() -> bytes:
    """Input [1, 1, 2048, 2048] convolved by a [512, 512] kernel padded from one constant (folding
    it is cheap): one run is ~6e11 multiply-accumulates, hours for the executor."""
    c = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "c")
    kernel = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 511, 511], np.int64), "pk")
    nodes = [
        helper.make_node("Pad", ["c", "pk"], ["k"], name="kernel"),
        helper.make_node("Conv", [INPUT_NAME, "k"], [OUTPUT_NAME], name="conv"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1, 2048, 2048])],
                             [_vi(OUTPUT_NAME, [1, 1, 1537, 1537])], [c, kernel]))


def node_without_outputs() -> bytes:
    """A Constant node with a tensor attribute and no outputs at all."""
    model = valid_model_proto()
    stray = helper.make_node("Constant", [], [], value=numpy_helper.from_array(_bias(), "v"))
    model.graph.node.append(stray)
    return _serialize(model)


def outputs_from_constants_only() -> bytes:
    """The graph output is ``Add(B, B)``: computed from weights only, never from the input."""
    nodes = [
        helper.make_node("Relu", [INPUT_NAME], ["unused"], name="relu"),
        helper.make_node("Add", ["B", "B"], [OUTPUT_NAME], name="add"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [4])], [_b()]))


def shapeless_input() -> bytes:
    """The valid model whose input declares no shape at all (pinning one must work)."""
    model = valid_model_proto()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return _serialize(model)


# --- registration hogs (they load; building them is what costs) ----------------------------


def matmul_chain(length: int = 4096, width: int = 2) -> bytes:
    """``length`` chained MatMuls by one tiny weight (≈ 109 KB for 4096): each is a segment, so
    registration would calibrate 4096 circuits (the reported 180 s stall)."""
    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "W")
    nodes = []
    previous = INPUT_NAME
    for i in range(length):
        output = OUTPUT_NAME if i == length - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, "W"], [output]))
        previous = output
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, width])],
                             [_vi(OUTPUT_NAME, [1, width])], [weight]))


def padded_state_hog(side: int = 4096, copies: int = 24) -> bytes:
    """Input [1, 1] padded to [side, side] (2**24 elements, within the tensor limit), then
    ``copies`` scaled copies of it, every one a model output: it loads, but one execution holds
    ``copies`` × 64 MiB of states (1.5 GiB), and calibration keeps every run's states. (With
    one output it used to need gigabytes only to calibrate whole; registration now tiles it.)"""
    pads = numpy_helper.from_array(np.array([0, 0, side - 1, side - 1], np.int64), "pads")
    nodes = [helper.make_node("Pad", [INPUT_NAME, "pads"], ["p"], name="pad")]
    weights = [pads]
    outputs = []
    for i in range(copies):
        weights.append(numpy_helper.from_array(np.full((1,), 1.0 + i, np.float32), f"k{i}"))
        name = OUTPUT_NAME if i == 0 else f"{OUTPUT_NAME}{i}"
        nodes.append(helper.make_node("Mul", ["p", f"k{i}"], [name], name=f"mul{i}"))
        outputs.append(_vi(name, [side, side]))
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1])], outputs, weights))


def shared_weight_chain(length: int = 128, width: int = 2048) -> bytes:
    """One [width, width] weight (16 MiB) used by ``length`` chained MatMuls: it loads, but each
    segment is a standalone model with its own copy of the weight (2 GiB for 128)."""
    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "W")
    nodes = []
    previous = INPUT_NAME
    for i in range(length):
        output = OUTPUT_NAME if i == length - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, "W"], [output]))
        previous = output
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, width])],
                             [_vi(OUTPUT_NAME, [1, width])], [weight]))


def overflowing_model() -> bytes:
    """``output = Exp(input · 1e9)``: finite weights, infinite states on inputs in (-1, 1)."""
    k = numpy_helper.from_array(np.full((1,), 1e9, np.float32), "k")
    nodes = [
        helper.make_node("Mul", [INPUT_NAME, "k"], ["h"], name="mul"),
        helper.make_node("Exp", ["h"], [OUTPUT_NAME], name="exp"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 3])], [_vi(OUTPUT_NAME, [1, 3])], [k]))


def unprovable_conv() -> bytes:
    """A 3x3 Conv without strides then Relu: it loads and runs, but EZKL cannot build the
    segment's circuit (calibration used to record it with a tolerance of 0)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.uniform(-0.5, 0.5, (2, 1, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], [OUTPUT_NAME], name="relu"),
    ]
    return _serialize(_model(nodes, [_vi(INPUT_NAME, [1, 1, 6, 6])],
                             [_vi(OUTPUT_NAME, [1, 2, 4, 4])], [weight]))


# --- the table -----------------------------------------------------------------------------

HOSTILE: list[Case] = [
    # external data
    ("ext_data_dotdot", ext_data_dotdot, ExternalDataRefused, {}),
    ("ext_data_absolute", ext_data_absolute, ExternalDataRefused, {}),
    ("ext_data_plain", ext_data_plain, ExternalDataRefused, {}),
    ("ext_data_location_without_entries", ext_data_location_without_entries,
     ExternalDataRefused, {}),
    ("ext_data_entries_default_location", ext_data_entries_default_location,
     ExternalDataRefused, {}),
    ("ext_data_bias", ext_data_bias, ExternalDataRefused, {}),
    ("ext_data_in_constant", ext_data_in_constant, ExternalDataRefused, {}),
    ("ext_data_in_subgraph", ext_data_in_subgraph, ExternalDataRefused, {}),
    # sizes
    ("claims_2gb_float", claims_2gb_float, ModelTooLarge, {}),
    ("claims_2gb_tiny_raw", claims_2gb_tiny_raw, ModelTooLarge, {}),
    ("claims_2pow40_elements", claims_2pow40_elements, ModelTooLarge, {}),
    ("claims_int64_overflow", claims_int64_overflow, ModelTooLarge, {}),
    ("constant_claims_2gb", constant_claims_2gb, ModelTooLarge, {}),
    ("intermediate_conv_pads", intermediate_conv_pads, ModelTooLarge, {}),
    ("intermediate_broadcast", intermediate_broadcast, ModelTooLarge, {}),
    ("intermediate_pad", intermediate_pad, ModelTooLarge, {}),
    ("constant_fold_bomb", constant_fold_bomb, ModelTooLarge, {}),
    ("constant_fold_bomb_huge", constant_fold_bomb_huge, ModelTooLarge, {}),
    ("too_many_nodes", five_nodes, ModelTooLarge, {"limits": LoadLimits(max_nodes=3)}),
    ("too_many_nodes_default", many_nodes, ModelTooLarge, {}),
    ("file_too_large", valid_model_bytes, ModelTooLarge,
     {"limits": LoadLimits(max_file_bytes=64)}),
    ("tensor_elements_limit", valid_model_bytes, ModelTooLarge,
     {"limits": LoadLimits(max_tensor_elements=8)}),
    ("constant_elements_limit", constant_weight_model, ModelTooLarge,
     {"limits": LoadLimits(max_tensor_elements=8)}),
    ("initializer_bytes_total", valid_model_bytes, ModelTooLarge,
     {"limits": LoadLimits(max_initializer_bytes=60)}),
    ("constant_bytes_total", constant_weight_model, ModelTooLarge,
     {"limits": LoadLimits(max_initializer_bytes=60)}),
    ("intermediate_elements_limit", intermediate_broadcast, ModelTooLarge,
     {"limits": LoadLimits(max_tensor_elements=2**20)}),
    # lying lengths with a small claimed size
    ("raw_data_short", raw_data_short, ModelDecodeError, {}),
    ("raw_data_long", raw_data_long, ModelDecodeError, {}),
    ("float_data_short", float_data_short, ModelDecodeError, {}),
    ("no_data_small", no_data_small, ModelDecodeError, {}),
    ("constant_raw_data_short", constant_raw_data_short, ModelDecodeError, {}),
    ("negative_dims", negative_dims, ModelDecodeError, {}),
    # not a (well-formed) ModelProto
    ("truncated_quarter", truncated_quarter, ModelDecodeError, {}),
    ("truncated_half", truncated_half, ModelDecodeError, {}),
    ("truncated_mid_initializer", truncated_mid_initializer, ModelDecodeError, {}),
    ("truncated_last_byte", truncated_last_byte, ModelDecodeError, {}),
    ("truncated_header", truncated_header, ModelDecodeError, {}),
    ("garbage", garbage, ModelDecodeError, {}),
    ("garbage_over_file_limit", garbage, ModelTooLarge,
     {"limits": LoadLimits(max_file_bytes=1024)}),
    ("text_file", text_file, ModelDecodeError, {}),
    ("empty", empty, ModelDecodeError, {}),
    ("pickle_payload", pickle_payload, ModelDecodeError, {}),
    ("wrong_kind_graph", wrong_kind_graph, ModelDecodeError, {}),
    ("wrong_kind_tensor", wrong_kind_tensor, ModelDecodeError, {}),
    ("model_without_graph", model_without_graph, ModelDecodeError, {}),
    ("pb_huge_length_graph", pb_huge_length_graph, ModelDecodeError, {}),
    ("pb_huge_length_raw_data", pb_huge_length_raw_data, ModelDecodeError, {}),
    ("pb_deep_nesting", pb_deep_nesting, ModelDecodeError, {}),
    # operators and constructs
    ("unknown_op", unknown_op, UnsupportedOperator, {}),
    ("custom_domain_op", custom_domain_op, UnsupportedOperator, {}),
    ("custom_domain_op_imported", custom_domain_op_imported, UnsupportedOperator, {}),
    ("if_subgraph", if_subgraph, UnsupportedOperator, {}),
    ("loop_subgraph", loop_subgraph, UnsupportedOperator, {}),
    ("scan_subgraph", scan_subgraph, UnsupportedOperator, {}),
    ("graph_attribute_on_relu", graph_attribute_on_relu, UnsupportedOperator, {}),
    ("graphs_attribute_on_relu", graphs_attribute_on_relu, UnsupportedOperator, {}),
    ("local_function_unused", local_function_unused, UnsupportedOperator, {}),
    ("local_function_called", local_function_called, UnsupportedOperator, {}),
    ("sparse_initializer", sparse_initializer, UnsupportedOperator, {}),
    ("constant_sparse_value", constant_sparse_value, UnsupportedOperator, {}),
    ("string_input", string_input, UnsupportedOperator, {}),
    # opsets
    ("opset_7", opset_7, UnsupportedOpset, {}),
    ("opset_8", opset_8, UnsupportedOpset, {}),
    ("opset_19", opset_19, UnsupportedOpset, {}),
    ("opset_30", opset_30, UnsupportedOpset, {}),
    ("opset_missing", opset_missing, UnsupportedOpset, {}),
    ("opset_only_custom_domain", opset_only_custom_domain, UnsupportedOpset, {}),
    # shapes and pins
    ("dynamic_unpinned", second_symbolic_dim, ShapeError, {}),
    ("missing_dim", missing_dim, ShapeError, {}),
    ("missing_shape", missing_shape, ShapeError, {}),
    ("second_symbolic_dim_unpinned", second_symbolic_dim, ShapeError,
     {"dims": {"batch_size": 1}}),
    ("pin_unknown_input", valid_model_bytes, ShapeError, {"shapes": {"nope": [1, 3]}}),
    ("pin_unknown_input_dynamic", dynamic_model_bytes, ShapeError,
     {"shapes": {"input": [1, 3], "nope": [1, 3]}}),
    ("pin_wrong_rank_long", dynamic_model_bytes, ShapeError, {"shapes": {"input": [1, 3, 1]}}),
    ("pin_wrong_rank_short", dynamic_model_bytes, ShapeError, {"shapes": {"input": [3]}}),
    ("pin_zero_dim_param", dynamic_model_bytes, ShapeError, {"dims": {"batch_size": 0}}),
    ("pin_negative_dim_param", dynamic_model_bytes, ShapeError, {"dims": {"batch_size": -1}}),
    ("pin_zero_shape", dynamic_model_bytes, ShapeError, {"shapes": {"input": [0, 3]}}),
    ("pin_negative_shape", dynamic_model_bytes, ShapeError, {"shapes": {"input": [-1, 3]}}),
    ("pin_contradicts_static", dynamic_model_bytes, ShapeError, {"shapes": {"input": [1, 5]}}),
    ("gemm_inner_mismatch", gemm_inner_mismatch, ShapeError, {}),
    ("add_not_broadcastable", add_not_broadcastable, ShapeError, {}),
    ("output_shape_mismatch", output_shape_mismatch, ShapeError, {}),
    ("value_info_mismatch", value_info_mismatch, ShapeError, {}),
    # graph structure
    ("dangling_input", dangling_input, InvalidGraph, {}),
    ("duplicate_output", duplicate_output, InvalidGraph, {}),
    ("output_never_produced", output_never_produced, InvalidGraph, {}),
    ("cycle", cycle, InvalidGraph, {}),
    ("self_loop", self_loop, InvalidGraph, {}),
    ("output_is_input", output_is_input, InvalidGraph, {}),
    ("node_overwrites_input", node_overwrites_input, InvalidGraph, {}),
    ("node_overwrites_initializer", node_overwrites_initializer, InvalidGraph, {}),
    ("duplicate_initializer", duplicate_initializer, InvalidGraph, {}),
    ("duplicate_input", duplicate_input, InvalidGraph, {}),
    ("node_without_outputs", node_without_outputs, InvalidGraph, {}),
    ("outputs_from_constants_only", outputs_from_constants_only, InvalidGraph, {}),
    ("shapeless_input_pinned_wrong", shapeless_input, ShapeError, {"shapes": {"input": [1, 5]}}),
    # values (finite, representable in a circuit)
    ("nan_weight", nan_weight, ModelRejected, {}),
    ("inf_weight", inf_weight, ModelRejected, {}),
    ("neg_inf_bias", neg_inf_bias, ModelRejected, {}),
    ("huge_weight", huge_weight, ModelRejected, {}),
    ("weight_just_over_circuit_bound", weight_just_over_circuit_bound, ModelRejected, {}),
    ("nan_in_constant_node", nan_in_constant_node, ModelRejected, {}),
    ("folded_inf", folded_inf, ModelRejected, {}),
    # folding bombs
    ("constant_pads_chain", constant_pads_chain, ModelTooLarge, {}),
    ("fold_matmul_bomb", fold_matmul_bomb, ModelTooLarge, {}),
    ("fold_conv_bomb", fold_conv_bomb, ModelTooLarge, {}),
    ("conv_compute_bomb", conv_compute_bomb, ModelTooLarge, {}),
]  # fmt: skip

#: Cases refused for a value, with the tensor their reason must name.
VALUE_CASES: dict[str, str] = {
    "nan_weight": "'W'", "inf_weight": "'W'", "neg_inf_bias": "'B'", "huge_weight": "'W'",
    "weight_just_over_circuit_bound": "'W'", "nan_in_constant_node": "'Wc'", "folded_inf": "'W'",
}

#: Other classes the contract accepts for some cases (beyond the one listed in HOSTILE).
ALSO_ACCEPTED: dict[str, tuple[type[ModelRejected], ...]] = {
    # Lying lengths where the claimed size is huge: "too large" or "undecodable".
    "claims_2gb_float": (ModelDecodeError,),
    "claims_2gb_tiny_raw": (ModelDecodeError,),
    "claims_2pow40_elements": (ModelDecodeError,),
    "claims_int64_overflow": (ModelDecodeError,),
    "constant_claims_2gb": (ModelDecodeError,),
    # Two defects the contract ranks equally: the op's domain, and importing that domain.
    "custom_domain_op_imported": (UnsupportedOpset,),
    "local_function_called": (UnsupportedOpset,),
    # External data inside a subgraph: refusing the subgraph first is as safe.
    "ext_data_in_subgraph": (UnsupportedOperator,),
    # A stack-exhaustion attempt that a parser may accept (then: a graph-valued attribute).
    "pb_deep_nesting": (UnsupportedOperator,),
    # A ModelProto without a graph may be called malformed or an invalid graph.
    "model_without_graph": (InvalidGraph,),
}

#: The external-data cases and the locations they refer to (relative to the model's directory).
EXTERNAL_CASES: dict[str, tuple[str, ...]] = {
    "ext_data_dotdot": (SECRET_REL,),
    "ext_data_absolute": (SECRET_ABS,),
    "ext_data_plain": (WEIGHTS_REL,),
    "ext_data_location_without_entries": (),
    "ext_data_entries_default_location": (WEIGHTS_REL,),
    "ext_data_bias": (SECRET_REL,),
    "ext_data_in_constant": (WEIGHTS_REL,),
    "ext_data_in_subgraph": (SECRET_REL,),
}


def accepted_errors(case_id: str, expected: type[ModelRejected]) -> tuple[type[ModelRejected], ...]:
    """Every class the loader may raise for ``case_id`` (``expected`` first)."""
    return (expected, *ALSO_ACCEPTED.get(case_id, ()))
