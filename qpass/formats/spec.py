"""``QuantSpec``: one value object that says how a tensor is quantized, and its string names.

Axis convention (the ONNX ``QuantizeLinear``/``DequantizeLinear`` one, so a spec lowers
without translation):

* ``PER_TENSOR``: one scale; ``axis`` is ignored.
* ``PER_CHANNEL``: ``axis`` is the *channel* axis: one scale per index along ``axis``,
  shared by all other axes. Weight ``W[out, in]`` per output channel: ``axis=0``
  (the default); activation ``X[tokens, hidden]`` per hidden channel: ``axis=-1``.
* ``PER_GROUP``: ``axis`` is the *blocked* axis (the reduction axis): it is cut into
  blocks of ``group_size`` and every index of the other axes gets its own scales.
  ``W[out, in]`` with groups of 128 along ``in``: ``axis=-1`` (the default); scales
  have shape ``[out, in / 128]`` (ONNX blocked layout).
* ``PER_TOKEN``: dynamic, one scale per row: shared along the last axis, one per index
  of all leading axes; ``axis`` is ignored.

Scales and zero points always come back with the rank of the input (the ``keepdim``
layout above) so that they broadcast, or repeat along ``axis`` for groups.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qpass.errors import ConfigError
from qpass.formats.elements import ElementType


class Granularity(enum.Enum):
    """Which elements share one scale (see the module docstring for ``axis``)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"


class ClipMethod(enum.Enum):
    """How the range behind a float32 scale is chosen."""

    ABSMAX = "absmax"  # the block's max |x| (min/max for asymmetric)
    PERCENTILE = "percentile"  # the ``percentile``-th percentile of |x| (or of x, both tails)
    MSE = "mse"  # grid search of the clip ratio minimising the block's squared error


class ScaleType(enum.Enum):
    """How scales are stored."""

    FLOAT32 = "float32"  # one float32 scale (and zero point) per block
    E8M0 = "e8m0"  # OCP MX / BFP: shared power-of-two exponent byte per block
    E4M3 = "e4m3"  # NVFP4: FP8 E4M3 scale per block times one float32 scale per tensor


_DEFAULT_AXIS = {Granularity.PER_CHANNEL: 0, Granularity.PER_GROUP: -1}


def _coerce(cls: type[enum.Enum], value: Any, field: str) -> enum.Enum:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in cls)
    msg = f"{field}={value!r} is not a valid {cls.__name__}; expected one of {choices}"
    raise ConfigError(msg)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: element type, who shares a scale, how the scale is found.

    This is the ``Format`` of the design: ``spec.quantize(x)``, ``spec.fake_quantize(x)``
    and ``QuantizedTensor.pack()`` are everything a pass or kernel needs. Build one with
    ``get_format("int4", group_size=64)`` or ``QuantSpec.from_dict(...)``.

    Integers: ``symmetric=True`` uses signed narrow-range codes ``[-(2^(b-1)-1), 2^(b-1)-1]``
    with ``scale = range / (2^(b-1)-1)`` and zero point 0 (INT8: ``absmax/127``, codes in
    [-127, 127], ONNX ``QuantizeLinear(int8)`` compatible); ``symmetric=False`` uses unsigned
    codes ``[0, 2^b-1]`` with a zero point (ONNX uint8/uint4). Floats are symmetric with
    ``scale = range / max_value``. With ``pad_tail`` a last group shorter than
    ``group_size`` is allowed (as ONNX blocked quantization allows): statistics use only
    its real elements (it is padded by repeating its last element, which leaves max, min
    and absmax unchanged; percentile clipping counts that element more often).
    ``float_zero_point`` (asymmetric integers): the grid is ``min + code * scale`` over the
    block's own [min, max], the zero point ``-min / scale`` stays a float32 instead of being
    rounded to an integer code (zero need not be on the grid). This is GGUF Q4_1's and HQQ's
    form; a model whose weights already sit on such a grid is reproduced exactly, where an
    integer zero point shifts the grid by up to half a step. ONNX MatMulNBits takes float zero
    points (in the scales' type); QDQ and compressed-tensors do not.
    """

    element: ElementType
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    clip: ClipMethod = ClipMethod.ABSMAX
    scale_type: ScaleType = ScaleType.FLOAT32
    percentile: float = 99.9
    mse_grid: int = 50
    mse_min_ratio: float = 0.2
    pad_tail: bool = False
    float_zero_point: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "element", _coerce(ElementType, self.element, "element"))
        set_(self, "granularity", _coerce(Granularity, self.granularity, "granularity"))
        set_(self, "clip", _coerce(ClipMethod, self.clip, "clip"))
        set_(self, "scale_type", _coerce(ScaleType, self.scale_type, "scale_type"))
        self._validate()

    def _validate(self) -> None:
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            msg = f"axis must be an int or None, got {self.axis!r}"
            raise ConfigError(msg)
        if self.granularity is Granularity.PER_GROUP:
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                msg = f"group_size must be a positive int for granularity=per_group, got {gs!r}"
                raise ConfigError(msg)
        elif self.group_size is not None:
            msg = (
                f"group_size={self.group_size!r} is only used with granularity=per_group "
                f"(got granularity={self.granularity.value})"
            )
            raise ConfigError(msg)
        if not self.symmetric:
            if self.element.is_float:
                msg = f"symmetric=False needs an integer element; {self.element.value} is symmetric only"
                raise ConfigError(msg)
            if self.scale_type is not ScaleType.FLOAT32:
                msg = f"symmetric=False needs scale_type=float32, got scale_type={self.scale_type.value}"
                raise ConfigError(msg)
        if self.float_zero_point and (self.symmetric or self.element.is_float):
            msg = "float_zero_point=True needs an asymmetric integer element (symmetric=False)"
            raise ConfigError(msg)
        if self.scale_type is not ScaleType.FLOAT32 and self.clip is not ClipMethod.ABSMAX:
            msg = (
                f"clip={self.clip.value} needs scale_type=float32; {self.scale_type.value} scales "
                "are defined from the block absmax"
            )
            raise ConfigError(msg)
        if self.scale_type is ScaleType.E4M3 and not self.element.is_float:
            msg = f"scale_type=e4m3 (NVFP4-style) needs a float element, got element={self.element.value}"
            raise ConfigError(msg)
        if not 50.0 < float(self.percentile) <= 100.0:
            msg = f"percentile must be in (50, 100], got {self.percentile!r}"
            raise ConfigError(msg)
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) or self.mse_grid < 1:
            msg = f"mse_grid must be a positive int, got {self.mse_grid!r}"
            raise ConfigError(msg)
        if not 0.0 < float(self.mse_min_ratio) <= 1.0:
            msg = f"mse_min_ratio must be in (0, 1], got {self.mse_min_ratio!r}"
            raise ConfigError(msg)

    # -- conveniences -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits per element (scales not included)."""
        return self.element.bits

    def resolved_axis(self, ndim: int) -> int:
        """The non-negative axis for a tensor of rank ``ndim`` (0 where the axis is unused)."""
        if self.granularity in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            return max(ndim - 1, 0) if self.granularity is Granularity.PER_TOKEN else 0
        axis = _DEFAULT_AXIS[self.granularity] if self.axis is None else self.axis
        if not -ndim <= axis < ndim:
            msg = f"axis={axis} is out of range for a tensor of rank {ndim}"
            raise ConfigError(msg)
        return axis % ndim

    def onnx_attributes(self, ndim: int) -> dict[str, int]:
        """``axis``/``block_size`` attributes of the matching ONNX Q/DQ node."""
        g = self.granularity
        if g is Granularity.PER_TENSOR:
            return {}
        if g is Granularity.PER_CHANNEL:
            return {"axis": self.resolved_axis(ndim)}
        if g is Granularity.PER_GROUP:
            return {"axis": self.resolved_axis(ndim), "block_size": int(self.group_size)}
        if ndim == 2:  # per-token on a matrix is per-axis along rows
            return {"axis": 0}
        msg = f"granularity=per_token on a rank-{ndim} tensor has no static ONNX Q/DQ form"
        raise ConfigError(msg)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (enum values as strings) for recipes and reports."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, enum.Enum):
                out[k] = v.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Parse a recipe entry: ``{"format": "int4", "group": 128, "symmetric": False, ...}``.

        ``format`` (or ``name``) picks a preset from ``get_format``; every other key
        overrides a field (``group`` is an alias of ``group_size``). Without a preset,
        ``element`` is required. Recipe-level keys (``algo``, ``dynamic``) are not format
        fields: remove them first; unknown keys raise ``ConfigError`` naming the key.
        """
        if not isinstance(data, Mapping):
            msg = f"a format entry must be a mapping, got {type(data).__name__}"
            raise ConfigError(msg)
        d = dict(data)
        name = d.pop("format", None) or d.pop("name", None)
        if "group" in d:
            d["group_size"] = d.pop("group")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            msg = f"unknown format key(s) {unknown}; expected 'format' and any of {sorted(known)}"
            raise ConfigError(msg)
        if name is not None:
            return get_format(name, **d)
        if "element" not in d:
            msg = "a format entry needs 'format' (a name such as 'int4') or 'element'"
            raise ConfigError(msg)
        return cls(**d)

    # The operations, so that a spec is the one handle a caller needs.
    def quantize(self, x: Any) -> Any:
        """``quantize(x, self)``."""
        from qpass.formats.quantize import quantize

        return quantize(x, self)

    def fake_quantize(self, x: Any) -> Any:
        """``fake_quantize(x, self)``."""
        from qpass.formats.quantize import fake_quantize

        return fake_quantize(x, self)


# ---------------------------------------------------------------------------------------
# Names (the recipe/CLI edge). Everything else works with enums.

_FLOAT_NAMES = {
    "fp8_e4m3": ElementType.FP8_E4M3,
    "fp8": ElementType.FP8_E4M3,
    "e4m3": ElementType.FP8_E4M3,
    "fp8_e5m2": ElementType.FP8_E5M2,
    "e5m2": ElementType.FP8_E5M2,
    "fp6_e3m2": ElementType.FP6_E3M2,
    "fp6_e2m3": ElementType.FP6_E2M3,
    "fp4_e2m1": ElementType.FP4_E2M1,
    "fp4": ElementType.FP4_E2M1,
}
_MX_NAMES = {
    "mxfp8": ElementType.FP8_E4M3,
    "mxfp8_e4m3": ElementType.FP8_E4M3,
    "mxfp8_e5m2": ElementType.FP8_E5M2,
    "mxfp6_e3m2": ElementType.FP6_E3M2,
    "mxfp6_e2m3": ElementType.FP6_E2M3,
    "mxfp4": ElementType.FP4_E2M1,
    "mxint8": ElementType.INT8,
}
MX_BLOCK = 32
NVFP4_BLOCK = 16
BFP_BLOCK = 8
INT_GROUP = 128
FP_LOW_BIT_GROUP = 32


def _preset(name: str) -> QuantSpec | None:
    m = re.fullmatch(r"(u?)int([2-8])", name)
    if m:
        et = ElementType(f"int{m.group(2)}")
        sym = not m.group(1)
        if et is ElementType.INT8:
            return QuantSpec(et, Granularity.PER_CHANNEL, symmetric=sym)
        return QuantSpec(et, Granularity.PER_GROUP, group_size=INT_GROUP, symmetric=sym)
    if name in _FLOAT_NAMES:
        et = _FLOAT_NAMES[name]
        if et.bits == 8:
            return QuantSpec(et, Granularity.PER_CHANNEL)
        return QuantSpec(et, Granularity.PER_GROUP, group_size=FP_LOW_BIT_GROUP)
    if name in _MX_NAMES:
        return QuantSpec(
            _MX_NAMES[name], Granularity.PER_GROUP, group_size=MX_BLOCK, scale_type=ScaleType.E8M0
        )
    if name == "nvfp4":
        return QuantSpec(
            ElementType.FP4_E2M1, Granularity.PER_GROUP, group_size=NVFP4_BLOCK, scale_type=ScaleType.E4M3
        )
    m = re.fullmatch(r"bfp(1[0-6])", name)
    if m:  # bfpN: 8-bit shared exponent + (N - 8)-bit signed mantissas (bfp16: int8, bfp12: int4)
        et = ElementType(f"int{int(m.group(1)) - 8}")
        return QuantSpec(et, Granularity.PER_GROUP, group_size=BFP_BLOCK, scale_type=ScaleType.E8M0)
    return None


def format_names() -> list[str]:
    """Every name ``get_format`` accepts."""
    ints = [f"{u}int{b}" for u in ("", "u") for b in range(2, 9)]
    bfp = [f"bfp{n}" for n in range(10, 17)]
    return ints + list(_FLOAT_NAMES) + list(_MX_NAMES) + ["nvfp4"] + bfp


def get_format(name: str, **overrides: Any) -> QuantSpec:
    """The preset spec for a format name, with fields overridden.

    Presets: ``int8`` per output channel (axis 0); ``int2``..``int7`` groups of 128 along
    the last axis; ``uintN`` the same, asymmetric; ``fp8``/``fp8_e4m3``/``fp8_e5m2`` per
    channel; ``fp6_*``/``fp4`` groups of 32; ``mxfp8[_e4m3|_e5m2]``, ``mxfp6_e3m2``,
    ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``: E8M0 scales per 32 along the last axis;
    ``nvfp4``: E4M3 scales per 16 and a float32 tensor scale; ``bfp10``..``bfp16``:
    E8M0 exponent per 8 with (N-8)-bit signed mantissas.
    Overriding ``granularity`` away from per_group drops the preset's ``group_size``;
    giving ``group_size`` alone switches to per_group.
    """
    if not isinstance(name, str):
        msg = f"name must be a format name string, got {type(name).__name__}"
        raise ConfigError(msg)
    key = name.strip().lower().replace("-", "_")
    spec = _preset(key)
    if spec is None:
        msg = f"unknown format name {name!r} (argument 'name'); known: {', '.join(format_names())}"
        raise ConfigError(msg)
    if not overrides:
        return spec
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        msg = f"unknown format field(s) {unknown} for {name!r}; expected any of {sorted(known)}"
        raise ConfigError(msg)
    ov = dict(overrides)
    if "granularity" in ov and "group_size" not in ov:
        if _coerce(Granularity, ov["granularity"], "granularity") is not Granularity.PER_GROUP:
            ov["group_size"] = None
    elif "group_size" in ov and "granularity" not in ov and ov["group_size"] is not None:
        ov["granularity"] = Granularity.PER_GROUP
    return dataclasses.replace(spec, **ov)
