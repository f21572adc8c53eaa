"""The operators refute accepts, and the shape operators it accepts only folded away.

Every operator of :data:`ALLOWED_OPS` is run deterministically by ONNX Runtime's CPU provider
and can be proven by EZKL 23; :data:`BACKED_BY` names, for each addition beyond the original
set, a model of the shared corpus (``../shared/models``) that uses it and proves.

:data:`FOLD_ONLY_OPS` read or build shapes. After the input shapes are pinned they compute
constants, and the loader folds them away; one left in the graph (because it depends on an
input's values) is refused with its name.
"""

from __future__ import annotations

#: For each operator added to the original 40: a model of the corpus that uses it, which EZKL
#: 23 builds and satisfies a circuit for (``python -m bench.probe_ezkl`` measures it) and ONNX
#: Runtime runs.
BACKED_BY: dict[str, str] = {
    "Acos": "trig", "And": "boolean", "ArgMax": "hard_max", "Asin": "trig", "Atan": "trig",
    "Cast": "1l_where", "Ceil": "rounding_ops", "Celu": "celu",
    "ConvTranspose": "1l_conv_transpose", "Cos": "trig", "Elu": "1l_elu",
    "Equal": "hierarchical_risk", "Expand": "hierarchical_risk", "Floor": "remainder",
    "Gather": "1l_average", "GatherElements": "gather_elements", "GatherND": "gather_nd",
    "Greater": "hummingbird_decision_tree", "HardSigmoid": "hard_sigmoid",
    "HardSwish": "hard_swish", "InstanceNormalization": "1l_instance_norm", "LSTM": "lstm",
    "Less": "1l_where", "Log": "log", "Not": "1l_where",
    "OneHot": "hummingbird_decision_tree", "Or": "bitwise_ops", "PRelu": "1l_prelu", "RNN": "rnn",
    "Reciprocal": "rsqrt", "ReduceL1": "reducel1", "ReduceL2": "reducel2",
    "ReduceLogSumExp": "logsumexp", "ReduceMax": "max", "ReduceMin": "min",
    "Resize": "1l_upsample", "Round": "rounding_ops", "ScatterElements": "scatter_elements",
    "ScatterND": "hierarchical_risk", "Selu": "selu", "Sign": "1l_lppool", "Sin": "trig",
    "Softplus": "mish", "Tan": "trig", "TopK": "1l_topk", "Trilu": "tril", "Where": "1l_where",
    "Xor": "boolean",
}

#: Operators of the default ONNX domain that may remain in a canonical model.
ALLOWED_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv",
        "Div", "Erf", "Exp", "Flatten", "Gemm", "GlobalAveragePool", "Identity",
        "LayerNormalization", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg",
        "Pad", "Pow", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Slice",
        "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Transpose", "Unsqueeze",
        *BACKED_BY,
    }
)  # fmt: skip

#: Operators accepted only where constant folding removes them: they read or build shapes, or
#: (``NonZero``) give a shape that depends on the values.
FOLD_ONLY_OPS: frozenset[str] = frozenset(
    {"Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero"}
)
