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
class WeightFormatChoice:
    """One candidate format of mixed precision: an INTn element and its grouping (None = per channel)."""

    format: str = "int8"
    group: int | None = None


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Per-layer choice among formats under an average-bits budget (the recipe's `weights.mixed`).

    The candidates are the base format (`weights.format`/`weights.group`) plus `candidates`.
    A layer's cost is its storage in bits: elements plus scales (`scale_bits` each, 16 as
    MatMulNBits stores fp16 scales) plus zero points when asymmetric; the budget is
    `budget_bits` times the number of weights of all quantized linears, never exceeded.
    Sensitivity is measured per layer and candidate with only that layer quantized:
    `model_output` = relative squared error of the model's outputs on `sensitivity_batches`
    calibration batches; `layer_output` = the layer's own output error tr(E H E^T)/tr(W H W^T).
    """

    budget_bits: float = 4.5
    candidates: tuple[WeightFormatChoice, ...] = ()
    sensitivity: Literal["model_output", "layer_output"] = "model_output"
    sensitivity_batches: int = 2
    scale_bits: int = 16
    method: Literal["dp", "greedy"] = "dp"

    def __post_init__(self) -> None:
        if not self.budget_bits > 0:
            msg = f"recipe key 'weights.mixed.budget_bits': must be > 0, got {self.budget_bits}"
            raise ConfigError(msg)
        if self.sensitivity_batches < 1:
            msg = f"recipe key 'weights.mixed.sensitivity_batches': must be >= 1, got {self.sensitivity_batches}"
            raise ConfigError(msg)
        if self.scale_bits not in (16, 32):
            msg = f"recipe key 'weights.mixed.scale_bits': must be 16 or 32, got {self.scale_bits}"
            raise ConfigError(msg)
        for i, c in enumerate(self.candidates):
            if c.format not in INT_FORMATS:
                msg = f"recipe key 'weights.mixed.candidates[{i}].format': {c.format!r} is not one of {INT_FORMATS}"
                raise ConfigError(msg)
            if c.group is not None and c.group <= 0:
                msg = f"recipe key 'weights.mixed.candidates[{i}].group': must be a positive int or null, got {c.group}"
                raise ConfigError(msg)


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantization: format, grouping (None = one scale per output channel), algorithm."""

    format: str = "int8"
    group: int | None = None
    symmetric: bool = True
    # asymmetric integers: the grid is the group's min + code * scale, its zero point a float
    # (GGUF Q4_1 / HQQ; qpass.formats.QuantSpec.float_zero_point); lowers to MatMulNBits
    float_zero_point: bool = False
    algo: Literal["rtn", "gptq", "awq"] = "rtn"  # awq: the `awq` scale search pass, then RTN
    clip_search: bool = False  # RTN: MSE-optimal clip ratio per channel/group
    # what the clip search minimises: "weight" = the group's squared rounding error;
    # "output" = the layer's output error on calibration X^T X (AWQ's auto-clip; keeps super weights)
    clip_objective: Literal["weight", "output"] = "weight"
    act_order: bool = True  # GPTQ: columns by descending Hessian diagonal (emits g_idx)
    # GPTQ: group scales from the original weights in channel order, so act-order needs no g_idx
    # (MatMulNBits runs without an input permutation; benchmarks/results/onnxruntime_vs_peers.md)
    static_groups: bool = False
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    lorc_rank: int = 0  # low-rank compensation: rank of the error correction U[out,r] @ V[r,in]; 0 = off
    protect: int | float = 0  # weights kept in float per layer: a count (int) or a fraction in (0, 1)
    protect_criterion: Literal["error", "magnitude"] = (
        "error"  # which weights (qpass.quant.protect.protect_outliers)
    )
    mixed: MixedPrecisionConfig | None = None  # per-layer format choice under a bit budget
    # AdaDim: "in" = groups of `group` input channels in one output row (the usual layout);
    # "out" = groups of `group` output rows in one input column (a salient input channel gets
    # its own scales); "auto" = per layer, the one with the lower output error on calibration X^T X
    group_axis: Literal["in", "out", "auto"] = "in"

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing needs each linear's X^T X (GPTQ, LoRC, protection, layer sensitivity, AdaDim)."""
        layer_sens = self.mixed is not None and self.mixed.sensitivity == "layer_output"
        auto_dim = self.group_axis == "auto"
        output_clip = self.clip_search and self.clip_objective == "output"
        return (
            self.algo == "gptq"
            or self.lorc_rank > 0
            or self.protect != 0
            or layer_sens
            or auto_dim
            or output_clip
        )

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
        if self.float_zero_point and (self.symmetric or is_block_format(self.format)):
            msg = "recipe key 'weights.float_zero_point': needs an integer format with 'symmetric: false'"
            raise ConfigError(msg)
        self._check_extras()
        self._check_group_axis()
        self._check_clip()
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

    def _check_clip(self) -> None:
        """The output clip objective is an RTN option with per-channel/group float scales."""
        if self.clip_objective not in ("weight", "output"):
            msg = f"recipe key 'weights.clip_objective': expected 'weight' or 'output', got {self.clip_objective!r}"
            raise ConfigError(msg)
        if self.clip_objective == "weight":
            return
        if not self.clip_search:
            msg = "recipe key 'weights.clip_objective': 'output' needs 'clip_search: true'"
            raise ConfigError(msg)
        if self.algo == "gptq" or self.group_axis != "in" or self.format not in INT_FORMATS:
            msg = (
                "recipe key 'weights.clip_objective': 'output' is an RTN option for integer formats "
                f"{INT_FORMATS} with groups along the input (got format {self.format!r}, "
                f"algo {self.algo!r}, group_axis {self.group_axis!r})"
            )
            raise ConfigError(msg)

    def _check_group_axis(self) -> None:
        """AdaDim groups: integer formats in groups, round-to-nearest, no extras (not combined yet)."""
        if self.group_axis not in ("in", "out", "auto"):
            msg = f"recipe key 'weights.group_axis': expected 'in', 'out' or 'auto', got {self.group_axis!r}"
            raise ConfigError(msg)
        if self.group_axis == "in":
            return
        if self.group is None or self.format not in INT_FORMATS:
            msg = (
                f"recipe key 'weights.group_axis': {self.group_axis!r} needs an integer format "
                f"{INT_FORMATS} with 'group' set, got format {self.format!r}, group {self.group}"
            )
            raise ConfigError(msg)
        combined = [
            k
            for k, on in (
                ("algo", self.algo == "gptq"),
                ("lorc_rank", self.lorc_rank > 0),
                ("protect", self.protect != 0),
                ("mixed", self.mixed is not None),
            )
            if on
        ]
        if combined:
            axis = self.group_axis
            msg = (
                f"recipe key 'weights.group_axis': {axis!r} is not combined with 'weights.{combined[0]}' yet"
            )
            raise ConfigError(msg)

    def _check_extras(self) -> None:
        """LoRC, protection, AWQ and mixed precision: integer weights only, values in range."""
        if self.lorc_rank < 0:
            msg = f"recipe key 'weights.lorc_rank': must be an integer >= 0, got {self.lorc_rank}"
            raise ConfigError(msg)
        p = self.protect
        if isinstance(p, float) and not 0.0 <= p < 1.0:
            msg = f"recipe key 'weights.protect': a fraction must be in [0, 1), got {p} (give a count as an int)"
            raise ConfigError(msg)
        if isinstance(p, int) and p < 0:
            msg = f"recipe key 'weights.protect': a count must be >= 0, got {p}"
            raise ConfigError(msg)
        extras = [
            k
            for k, on in (
                ("lorc_rank", self.lorc_rank > 0),
                ("protect", p != 0),
                ("algo", self.algo == "awq"),
                ("mixed", self.mixed is not None),
            )
            if on
        ]
        if extras and self.format not in INT_FORMATS:
            msg = f"recipe key 'weights.{extras[0]}': needs an integer weight format {INT_FORMATS}, got {self.format!r}"
            raise ConfigError(msg)
        if self.mixed is not None and (self.lorc_rank > 0 or p != 0):
            key = "lorc_rank" if self.lorc_rank > 0 else "protect"
            msg = f"recipe key 'weights.{key}': not combined with 'weights.mixed' (its budget ignores corrections)"
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


KV_FORMATS = ("int8", "int4", "fp8_e4m3")


@dataclass(frozen=True)
class KVCacheConfig:
    """The recipe's `kv_cache:` section (qpass.lm_kv_cache): how keys and values are stored."""

    format: str = "int8"
    k_granularity: Literal["per_channel", "per_token"] = "per_channel"
    v_granularity: Literal["per_token", "per_channel"] = "per_token"
    rotate: Literal["none", "hadamard"] = "none"
    residual: int = 32  # most recent tokens kept in float
    group: int = 32  # tokens sharing a per-channel scale
    symmetric: bool = False  # integers: asymmetric (min/max) by default, as KIVI

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            msg = f"recipe key 'kv_cache.format': {self.format!r}; expected one of {KV_FORMATS}"
            raise ConfigError(msg)
        for key, value, allowed in (
            ("k_granularity", self.k_granularity, ("per_channel", "per_token")),
            ("v_granularity", self.v_granularity, ("per_token", "per_channel")),
            ("rotate", self.rotate, ("none", "hadamard")),
        ):
            if value not in allowed:
                msg = f"recipe key 'kv_cache.{key}': {value!r}; expected one of {allowed}"
                raise ConfigError(msg)
        if self.residual < 0 or self.group < 1:
            msg = f"recipe key 'kv_cache': residual >= 0 and group >= 1 needed, got {self.residual}, {self.group}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class CalibrationConfig:
    """How the quantize stage calibrates (the recipe's `calibration:`).

    `sequential`: run calibration and the weight algorithm one residual block at a time
    (`qpass.pipeline`), each block calibrated on the outputs of the blocks before it; `False`
    calibrates the whole graph in one go on the float model (the one-shot way). `inputs`:
    "quantized" feeds block i the outputs of block i-1 with its weights (and activations)
    already quantized, so each block's GPTQ corrects the error arriving from upstream, as GPTQ's
    paper does; "float" feeds the float outputs (the statistics are then the one-shot ones,
    which the tests use to check the block-wise execution itself).

    `objective`: what each layer's weight algorithm minimises. "layer" is GPTQ's own
    ||W X - Ŵ X||² on the inputs X the layer now receives (X^T X from the quantized upstream);
    it fits the layer to its new inputs but does not correct the error that came with them.
    "float_outputs" minimises ||W X_fp - Ŵ X||², X_fp the float model's inputs of the same layer
    on the same tokens (GPTAQ's asymmetric calibration): the layer also absorbs the drift arriving
    from upstream. It needs a float copy of the block inputs and one more pass per block.
    Experimental: the fit has a free weight per input channel and output, and with a few thousand
    calibration tokens it overfits (SmolLM2-135M, 16 x 256 tokens: held-out perplexity 72.5 vs
    34.7 one-shot for w4a16-gptq; benchmarks/results/pipeline_sequential.md).
    """

    sequential: bool = False
    inputs: Literal["quantized", "float"] = "quantized"
    objective: Literal["layer", "float_outputs"] = "layer"
    # the values crossing the current cut (all batches) above this many MiB are written to a
    # temporary folder and memory-mapped back: the OS pages them in as each batch runs
    offload_mb: float | None = None

    def __post_init__(self) -> None:
        if self.objective == "float_outputs" and (not self.sequential or self.inputs != "quantized"):
            msg = "calibration.objective float_outputs needs sequential: true with inputs: quantized"
            raise ConfigError(msg)
