"""The names a pass uses for what it finds in a graph: ops, activations, constants.

Plain frozen data, backend-neutral: `GraphView` answers with these, passes hold them and put
them into edits, and the adapters map them back to their own FX or ONNX nodes by name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(enum.Enum):
    """What an op is, as far as the passes care."""

    LINEAR = "linear"  # y = x @ W^T (+ b) with a constant W: Linear, MatMul(x, W), Gemm
    CONV = "conv"  # Conv1d/2d/3d (grouped, depthwise): weight [out, in/groups, k...]
    CONV_TRANSPOSE = "conv_transpose"  # not quantized yet: reported as left in float
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    MUL = "mul"
    ADD = "add"
    SUB = "sub"
    DIV = "div"
    MATMUL = "matmul"  # two activations (attention scores, probs @ V)
    ATTENTION = "attention"  # fused scaled-dot-product attention
    ACTIVATION = "activation"  # gelu, silu, relu, tanh, ...
    SOFTMAX = "softmax"
    RESHAPE = "reshape"  # view, reshape, flatten, unsqueeze, squeeze
    TRANSPOSE = "transpose"  # transpose, permute
    EXPAND = "expand"  # expand, repeat (GQA key/value replication)
    CAST = "cast"  # dtype casts, clone, contiguous, dropout in eval: identities for the math
    SHAPE_OF = "shape_of"  # reads only the shape (ONNX Shape/Size, aten.sym_size)
    ROTATION = "rotation"  # an online rotation qpass inserted (x @ Q): never quantized as a layer
    OTHER = "other"


ALL_KINDS = frozenset(OpKind)


@dataclass(frozen=True)
class ValueRef:
    """An activation edge: the output of an op or a graph input."""

    name: str


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor (weight, bias, norm gamma/beta, a multiplier) stored in the graph."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OpRef:
    """One op. `op_type` is the backend's own name (aten target or ONNX op type), for messages."""

    name: str
    kind: OpKind
    op_type: str


@dataclass(frozen=True)
class WeightRef:
    """The constant weight of a linear/conv op with its canonical axes (Gemm transB, MatMul side hidden)."""

    const: ConstRef
    in_axis: int
    out_axis: int
    bias: ConstRef | None = None

    @property
    def in_features(self) -> int:
        return self.const.shape[self.in_axis]

    @property
    def out_features(self) -> int:
        return self.const.shape[self.out_axis]


@dataclass(frozen=True)
class ResidualSum:
    """A norm that first adds its inputs (ONNX Runtime's Skip*LayerNormalization): the summed
    activations, a constant bias added with them, and the sum itself when the op emits it.
    """

    inputs: tuple[ValueRef, ...]
    bias: ConstRef | None
    total: ValueRef | None


@dataclass(frozen=True)
class NormParams:
    """The per-channel affine parameters of a normalisation op (gamma, beta), channel axis last."""

    gamma: ConstRef | None
    beta: ConstRef | None
