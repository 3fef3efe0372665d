"""Quantize, dequantize and fake-quantize tensors with a ``QuantSpec``.

All work is vectorised over rows (``Blocking``); no Python loop runs per block.
Computation is in float32 whatever the input dtype (float64 inputs are rounded to
float32 first), matching ONNX ``QuantizeLinear``: ``code = saturate(round(x / scale) + zp)``
with round-half-to-even, and ``DequantizeLinear``: ``(code - zp) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qpass.errors import ConfigError
from qpass.formats.blocking import Blocking
from qpass.formats.elements import (
    ElementType,
    decode_float,
    encode_float,
    encode_int,
    int_range,
    int_to_bits,
)
from qpass.formats.scales import RowParams, fake_rows, row_params
from qpass.formats.spec import QuantSpec, ScaleType
from qpass.formats.tiling import map_rows

if TYPE_CHECKING:
    from qpass.formats.packing import PackedTensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_float_tensor(x: Any, name: str = "x") -> torch.Tensor:
    """Validate an input tensor (numpy arrays are converted) and return it."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        msg = f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}"
        raise ConfigError(msg)
    if x.dtype not in _FLOAT_DTYPES:
        msg = f"{name} must be a floating-point tensor (float32/16, bfloat16, float64), got dtype {x.dtype}"
        raise ConfigError(msg)
    return x


def _check_spec(spec: Any) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        msg = f"spec must be a QuantSpec (see get_format), got {type(spec).__name__}"
        raise ConfigError(msg)
    return spec


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Codes plus the parameters that give them values.

    ``codes`` has the input's shape: int8 signed values for symmetric integers (also the
    MXINT8/BFP mantissas), uint8 unsigned values for asymmetric integers, uint8 bit patterns
    for minifloats. ``scale`` is the float32 effective scale in the keepdim layout of
    ``Blocking.scale_shape`` (value = ``(code - zero_point) * scale``); ``scale_bits`` is
    the stored scale (E8M0 byte for MX/BFP; FP8 E4M3 bits for NVFP4, whose
    ``scale == e4m3(scale_bits) * tensor_scale``). For integer elements under E8M0 the
    element is fixed point: ``scale == 2**(byte - 127) * 2**-(bits - 2)``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    zero_point: torch.Tensor | None = None
    scale_bits: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return self.codes.shape

    @property
    def blocking(self) -> Blocking:
        """Row layout of this tensor."""
        return Blocking.of(self.codes.shape, self.spec)

    def code_bits(self) -> torch.Tensor:
        """uint8 bit patterns of the codes (low ``bits`` bits; two's complement for signed)."""
        if self.codes.dtype == torch.int8:
            return int_to_bits(self.codes, self.spec.bits)
        return self.codes

    def dequantize(self) -> torch.Tensor:
        """``dequantize(self)``."""
        return dequantize(self)

    def pack(self) -> PackedTensor:
        """Codes packed ONNX-style (see ``qpass.formats.packing``), scales as stored."""
        from qpass.formats.packing import pack_tensor

        return pack_tensor(self)

    def numpy_codes(self) -> np.ndarray:
        """Codes as a numpy array of the matching ``ml_dtypes``/numpy type (ONNX initializers)."""
        from qpass.formats.interop import codes_to_numpy

        return codes_to_numpy(self)


def _params(x: torch.Tensor, spec: QuantSpec) -> tuple[Blocking, torch.Tensor, RowParams]:
    blk = Blocking.of(x.shape, spec)
    rows = blk.to_rows(x.to(torch.float32))
    valid = blk.valid_mask(x.device)
    return blk, rows, row_params(rows, spec, valid)


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    # NVFP4 block scales can round to zero; those blocks dequantize to zero anyway.
    return torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]


def _encode_tile(
    rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    y = rows / _divisor(scale)
    et = spec.element
    if et.is_float:
        return encode_float(y, et)
    if zp is None:
        return encode_int(y, et, narrow=True)
    top = 2**et.bits - 1
    z = zp.to(torch.float32)[:, None]
    if zp.is_floating_point():  # float zero point (see QuantSpec.float_zero_point)
        return torch.round(y.add_(z)).clamp_(0, top).to(torch.uint8)
    return torch.round(y).add_(z).clamp_(0, top).to(torch.uint8)


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    if not spec.element.is_float and spec.symmetric:
        return torch.int8
    return torch.uint8


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize ``x`` to codes and scales; ``dequantize`` inverts it up to rounding."""
    x = as_float_tensor(x)
    spec = _check_spec(spec)
    blk, rows, p = _params(x, spec)
    codes = map_rows(
        lambda r, sc, zp: _encode_tile(r, sc, zp, spec), rows, (p.scale, p.zero_point), _code_dtype(spec)
    )
    codes = blk.from_rows(codes)
    lay = blk.params_to_layout
    return QuantizedTensor(
        codes=codes.contiguous(),
        scale=lay(p.scale).contiguous(),
        spec=spec,
        zero_point=None if p.zero_point is None else lay(p.zero_point).contiguous(),
        scale_bits=None if p.scale_bits is None else lay(p.scale_bits).contiguous(),
        tensor_scale=p.tensor_scale,
        dtype=x.dtype,
    )


def code_values(codes: torch.Tensor, et: ElementType) -> torch.Tensor:
    """float32 value of each code before scaling (integers: the integer itself)."""
    if et.is_float:
        return decode_float(codes, et)
    return codes.to(torch.float32)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values of a ``QuantizedTensor`` in its original dtype (or ``dtype``)."""
    if not isinstance(qt, QuantizedTensor):
        msg = f"qt must be a QuantizedTensor, got {type(qt).__name__}"
        raise ConfigError(msg)
    blk = qt.blocking
    et = qt.spec.element
    scale = blk.params_from_layout(qt.scale).to(torch.float32)
    zp = None if qt.zero_point is None else blk.params_from_layout(qt.zero_point)

    def tile(c: torch.Tensor, sc: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        v = code_values(c, et)
        if z is not None:
            v = v - z.to(torch.float32)[:, None]
        return v * sc[:, None]

    out = map_rows(tile, blk.to_rows(qt.codes), (scale, zp), torch.float32)
    return blk.from_rows(out).to(dtype or qt.dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize: same shape and dtype as ``x``, values on the format's grid."""
    x = as_float_tensor(x)
    spec = _check_spec(spec)
    blk, rows, p = _params(x, spec)

    def tile(r: torch.Tensor, sc: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
        out = fake_rows(r, _divisor(sc)[:, 0], zp, spec)
        if spec.scale_type is ScaleType.E4M3:  # blocks whose E4M3 scale rounded to zero
            out = out * (sc != 0)[:, None]
        return out

    out = map_rows(tile, rows, (p.scale, p.zero_point), torch.float32)
    return blk.from_rows(out).to(x.dtype)


def compute_scale_zero_point(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective float32 scale and the zero point ``quantize`` would use, in keepdim layout.

    Integers get a zero point tensor (int8 zeros when symmetric, uint8 when asymmetric);
    floats get None. For ONNX ``QuantizeLinear``: per-tensor use ``scale.reshape(())``,
    per-channel ``scale.reshape(-1)`` with ``spec.onnx_attributes(x.ndim)``, per-group the
    tensors as they are (ONNX blocked layout).
    """
    x = as_float_tensor(x)
    spec = _check_spec(spec)
    blk, _, p = _params(x, spec)
    scale = blk.params_to_layout(p.scale).contiguous()
    if spec.element.is_float:
        return scale, None
    if p.zero_point is None:
        return scale, torch.zeros(blk.scale_shape, dtype=torch.int8, device=scale.device)
    return scale, blk.params_to_layout(p.zero_point).contiguous()


def int_code_range(spec: QuantSpec) -> tuple[int, int]:
    """The code range ``quantize`` produces for an integer spec."""
    if spec.symmetric:
        return int_range(spec.element, narrow=True)
    return 0, 2**spec.bits - 1
