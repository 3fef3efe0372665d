"""ATen and ONNX op names mapped to `OpKind`, side by side, so a gap on one side is visible.

Each row: (OpKind, aten overload packets, ONNX op types). MatMul/matmul start as MATMUL and
the adapters promote them to LINEAR when the right-hand operand is a constant weight.
"""

from __future__ import annotations

from qpass.graph.refs import OpKind

_TABLE: list[tuple[OpKind, tuple[str, ...], tuple[str, ...]]] = [
    (OpKind.LINEAR, ("linear",), ("Gemm",)),
    (OpKind.MATMUL, ("matmul", "mm", "bmm"), ("MatMul",)),
    (OpKind.CONV, ("conv1d", "conv2d", "conv3d", "convolution"), ("Conv",)),
    (OpKind.CONV_TRANSPOSE, ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), ("ConvTranspose",)),
    (OpKind.LAYER_NORM, ("layer_norm", "native_layer_norm"), ("LayerNormalization", "SkipLayerNormalization")),
    (
        OpKind.RMS_NORM,
        ("rms_norm",),
        ("RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
    ),
    (OpKind.MUL, ("mul",), ("Mul",)),
    (OpKind.ADD, ("add",), ("Add",)),
    (OpKind.SUB, ("sub",), ("Sub",)),
    (OpKind.DIV, ("div",), ("Div",)),
    (OpKind.ATTENTION, ("scaled_dot_product_attention",), ("Attention", "GroupQueryAttention")),
    (
        OpKind.ACTIVATION,
        ("gelu", "silu", "relu", "tanh", "sigmoid", "erf", "hardtanh", "elu", "leaky_relu", "clamp", "relu6"),
        ("Gelu", "FastGelu", "Relu", "Tanh", "Sigmoid", "Erf", "Elu", "LeakyRelu", "HardSigmoid", "Clip"),
    ),
    (OpKind.SOFTMAX, ("softmax", "_softmax", "_safe_softmax"), ("Softmax",)),
    (
        OpKind.RESHAPE,
        ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten"),
        ("Reshape", "Flatten", "Unsqueeze", "Squeeze"),
    ),
    (OpKind.TRANSPOSE, ("transpose", "permute", "t"), ("Transpose",)),
    (OpKind.EXPAND, ("expand", "repeat", "repeat_interleave"), ("Expand", "Tile")),
    (
        OpKind.CAST,
        ("_to_copy", "to", "clone", "contiguous", "dropout", "alias", "detach", "type_as"),
        ("Cast", "Identity", "Dropout", "CastLike"),
    ),
    (OpKind.SHAPE_OF, ("sym_size", "size", "sym_numel", "_assert_tensor_metadata"), ("Shape", "Size")),
]

# ONNX Runtime's fused residual norms (Skip*) and GroupQueryAttention: their inputs and outputs by
# position are read in `onnx_contrib`.
ATEN_KINDS: dict[str, OpKind] = {name: kind for kind, aten, _ in _TABLE for name in aten}
ONNX_KINDS: dict[str, OpKind] = {name: kind for kind, _, onnx in _TABLE for name in onnx}


def aten_kind(packet_name: str) -> OpKind:
    """Kind of an aten op given its overload packet name (e.g. 'linear' for aten.linear.default)."""
    return ATEN_KINDS.get(packet_name, OpKind.OTHER)


def onnx_kind(op_type: str, domain: str = "") -> OpKind:
    """Kind of an ONNX op (default and com.microsoft domains)."""
    if domain not in ("", "ai.onnx", "com.microsoft"):
        return OpKind.OTHER
    return ONNX_KINDS.get(op_type, OpKind.OTHER)
