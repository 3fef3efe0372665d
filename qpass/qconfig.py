"""Typed quantization configs for weights and activations (the recipe's `weights:` and `activations:`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from qpass.errors import ConfigError


class ActGranularity(enum.Enum):
    """How activation scales are shared."""

    PER_TENSOR = "per_tensor"
    PER_TOKEN = "per_token"


# integer formats the torch path runs (reference modules); ONNX lowering takes int8 today
WEIGHT_FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2")
ACTIVATION_FORMATS = ("int8", "int6", "int4")


def format_bits(name: str) -> int:
    return int(name.removeprefix("int"))


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantization: format, grouping (None = one scale per output channel), algorithm."""

    format: str = "int8"
    group: int | None = None
    symmetric: bool = True
    algo: Literal["rtn", "gptq"] = "rtn"
    clip_search: bool = False  # RTN: MSE-optimal clip ratio per channel/group
    act_order: bool = True  # GPTQ: columns by descending Hessian diagonal (emits g_idx)
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            msg = f"recipe key 'weights.format': {self.format!r} is not supported yet; expected one of {WEIGHT_FORMATS}"
            raise ConfigError(msg)
        if self.group is not None and self.group <= 0:
            msg = f"recipe key 'weights.group': must be a positive integer or null, got {self.group}"
            raise ConfigError(msg)
        if self.damp <= 0:
            msg = f"recipe key 'weights.damp': must be > 0, got {self.damp}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Activation quantization of linear inputs: static per tensor (calibrated) or dynamic per token."""

    format: str = "int8"
    granularity: ActGranularity = ActGranularity.PER_TENSOR
    dynamic: bool = False
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.format not in ACTIVATION_FORMATS:
            msg = (
                f"recipe key 'activations.format': {self.format!r} is not supported yet; "
                f"expected one of {ACTIVATION_FORMATS}"
            )
            raise ConfigError(msg)
        if self.granularity is ActGranularity.PER_TOKEN and not self.dynamic:
            msg = "recipe key 'activations.dynamic': per_token activation scales must be dynamic (dynamic: true)"
            raise ConfigError(msg)


class WeightOp(enum.Enum):
    """How ONNX lowering stores quantized weights (the recipe's `lowering.weight_op`)."""

    AUTO = "auto"  # int8 per channel: QDQ / MatMulInteger; anything else: MatMulNBits
    MATMULNBITS = "matmulnbits"  # com.microsoft MatMulNBits (4/8-bit, blocks of 16..256, g_idx)
    DEQUANTIZE_LINEAR = "dequantize_linear"  # opset-21 blocked DequantizeLinear (int4/int8) + MatMul


class RotationOp(enum.Enum):
    """How an online Hadamard rotation is lowered to ONNX (the recipe's `lowering.rotation_op`)."""

    AUTO = "auto"  # the faster of the two per size, as measured (lowering/onnx_functions.py)
    MATMUL = "matmul"  # x @ Q with Q a constant
    FWHT = "fwht"  # qpass.HadamardTransform: a function op computing the fast transform


@dataclass(frozen=True)
class OnnxLoweringConfig:
    """ONNX Runtime lowering options (the recipe's `lowering:`); ignored by the torch target."""

    weight_op: WeightOp = WeightOp.AUTO
    accuracy_level: int = 0  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute of A
    rotation_op: RotationOp = RotationOp.AUTO
    g_idx: bool = False  # act-order as MatMulNBits g_idx (else: permute the input, faster kernel)
    optimize: bool = True  # constant folding and dead-node removal after lowering

    def __post_init__(self) -> None:
        if self.accuracy_level not in range(5):
            msg = f"recipe key 'lowering.accuracy_level': expected 0..4, got {self.accuracy_level}"
            raise ConfigError(msg)
