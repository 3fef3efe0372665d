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


# integer formats: scales chosen per channel or per `group` (float32 scales, optional zero point)
INT_FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2")
# float and block formats (qpass.formats presets): element type, block and scale type are fixed
# by the format (MX: 32-element blocks with E8M0 scales, NVFP4: 16 with E4M3 scales, BFP: 8)
BLOCK_FORMATS = (
    "fp8_e4m3",
    "fp8_e5m2",
    "mxfp8",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4",
    "mxint8",
    "nvfp4",
    "bfp16",
    "bfp14",
    "bfp12",
)
WEIGHT_FORMATS = INT_FORMATS + BLOCK_FORMATS
ACTIVATION_FORMATS = ("int8", "int6", "int4", *BLOCK_FORMATS)


def format_bits(name: str) -> int:
    """Bits per element (block formats: excluding their shared scales)."""
    if name in INT_FORMATS:
        return int(name.removeprefix("int"))
    from qpass.formats import get_format

    return get_format(name).element.bits


def is_block_format(name: str) -> bool:
    """A float or block format whose scales the format itself fixes (not an INTn with chosen groups)."""
    return name in BLOCK_FORMATS


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
        if is_block_format(self.format):
            if self.group is not None:
                msg = (
                    f"recipe key 'weights.group': {self.format} fixes its own blocks; "
                    f"leave 'group' unset (got {self.group})"
                )
                raise ConfigError(msg)
            if not self.symmetric:
                msg = f"recipe key 'weights.symmetric': {self.format} is symmetric; set 'symmetric: true'"
                raise ConfigError(msg)
            if self.clip_search and self.format not in ("fp8_e4m3", "fp8_e5m2"):
                msg = f"recipe key 'weights.clip_search': {self.format} scales follow the block absmax"
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
        if is_block_format(self.format) and not self.dynamic:
            msg = (
                f"recipe key 'activations.dynamic': {self.format} activations are quantized at run time "
                "in the format's own blocks (dynamic: true)"
            )
            raise ConfigError(msg)
