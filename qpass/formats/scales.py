"""Per-row scales (and zero points) for every scale type and clip method.

Rows come from ``Blocking.to_rows``: each row shares one scale. The *effective* scale
returned here is what divides ``x`` before rounding and multiplies codes when
dequantizing, so quantize, dequantize and ONNX lowering all use the same float32 numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qpass.formats.e8m0 import E8M0_NAN, decode_e8m0, e8m0_from_exponent, floor_log2
from qpass.formats.elements import ElementType, decode_float, encode_float, round_to_float
from qpass.formats.spec import ClipMethod, QuantSpec, ScaleType
from qpass.formats.tiling import tiles


@dataclass(frozen=True)
class RowParams:
    """Quantization parameters of each row (all tensors are ``[rows]``)."""

    scale: torch.Tensor  # float32 effective scale
    zero_point: torch.Tensor | None = None  # uint8, asymmetric integers only
    scale_bits: torch.Tensor | None = None  # uint8 stored scale: E8M0 byte or FP8 E4M3 bits
    tensor_scale: torch.Tensor | None = None  # float32 scalar, E4M3 (NVFP4) scales only


def qmax(et: ElementType) -> float:
    """Largest code magnitude used by symmetric quantization."""
    return et.max_value


def int_unit(et: ElementType) -> float:
    """Fixed-point weight of one integer code under a power-of-two scale: 2^-(bits-2)."""
    return 2.0 ** -(et.bits - 2)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero scales (all-zero rows) by 1 so that division and ONNX stay well defined."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _kth_abs(rows: torch.Tensor, percentile: float) -> torch.Tensor:
    k = max(1, min(rows.shape[1], int(round(percentile / 100.0 * rows.shape[1]))))
    return rows.abs().kthvalue(k, dim=1).values


def _kth(rows: torch.Tensor, percentile: float) -> torch.Tensor:
    n = rows.shape[1]
    k = max(1, min(n, int(round(percentile / 100.0 * n))))
    return rows.kthvalue(k, dim=1).values


def fake_rows(
    rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Quantize-dequantize rows with per-row ``scale``/``zp`` (float32 in, float32 out)."""
    s = scale[:, None]
    y = rows / s
    et = spec.element
    if et.is_float:
        return round_to_float(y, et) * s
    if zp is None:
        q = qmax(et)
        return torch.round(y).clamp_(-q, q) * s
    z = zp.to(torch.float32)[:, None]
    top = float(2**et.bits - 1)
    if zp.is_floating_point():  # float zero point: the code is round(x / s + z) itself
        return (torch.round(y.add_(z)).clamp_(0, top) - z) * s
    return (torch.round(y).add_(z).clamp_(0, top) - z) * s


def _affine_from_range(
    lo: torch.Tensor, hi: torch.Tensor, et: ElementType
) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    top = float(2**et.bits - 1)
    scale = _safe((hi - lo) / top)
    zp = torch.round(-lo / scale).clamp_(0, top).to(torch.uint8)
    return scale, zp


def _offset_from_range(lo: torch.Tensor, hi: torch.Tensor, et: ElementType) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float zero point of the grid lo + code * scale (zero need not be on it)."""
    top = float(2**et.bits - 1)
    scale = _safe((hi - lo) / top)
    return scale, (-lo / scale).to(torch.float32)


def _float32_params(rows: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None) -> RowParams:
    et = spec.element
    clip = spec.clip
    if spec.symmetric:
        if clip is ClipMethod.PERCENTILE:
            r = _kth_abs(rows, spec.percentile)
        else:
            r = absmax(rows)
        base = _safe(r / qmax(et))
        if clip is ClipMethod.MSE:
            base = _mse_search(rows, spec, valid, lambda ratio: (_safe(r * ratio / qmax(et)), None))[0]
        return RowParams(base)
    if clip is ClipMethod.PERCENTILE:
        lo, hi = _kth(rows, 100.0 - spec.percentile), _kth(rows, spec.percentile)
    else:
        lo, hi = torch.aminmax(rows, dim=1)
    from_range = _offset_from_range if spec.float_zero_point else _affine_from_range
    if clip is ClipMethod.MSE:
        scale, zp = _mse_search(rows, spec, valid, lambda ratio: from_range(lo * ratio, hi * ratio, et))
        return RowParams(scale, zp)
    scale, zp = from_range(lo, hi, et)
    return RowParams(scale, zp)


def _mse_search(
    rows: torch.Tensor,
    spec: QuantSpec,
    valid: torch.Tensor | None,
    params_at: Callable[[float], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grid search of the clip ratio (1 down to ``mse_min_ratio``) minimising each row's error.

    Ties keep the larger ratio (the grid is scanned from 1 and ``argmin`` takes the first).
    """
    ratios = torch.linspace(1.0, float(spec.mse_min_ratio), spec.mse_grid).tolist()
    cands = [params_at(r) for r in ratios]
    errs = torch.zeros(len(cands), rows.shape[0], dtype=torch.float64, device=rows.device)
    for rs, cs in tiles(rows):
        tile = rows[rs, cs]
        for i, (scale, zp) in enumerate(cands):
            e = (fake_rows(tile, scale[rs], None if zp is None else zp[rs], spec) - tile).square_()
            if valid is not None:
                e = e * valid[rs, cs]
            errs[i, rs] += e.sum(dim=1, dtype=torch.float64)
    best = errs.argmin(dim=0)
    idx = torch.arange(rows.shape[0], device=rows.device)
    scale = torch.stack([c[0] for c in cands])[best, idx]
    if cands[0][1] is None:
        return scale, None
    return scale, torch.stack([c[1] for c in cands])[best, idx]


def absmax(rows: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| without materialising ``rows.abs()`` (NaN propagates)."""
    lo, hi = torch.aminmax(rows, dim=1)
    return torch.maximum(hi.abs(), lo.abs())  # abs: no -0.0 for all-zero rows


def _e8m0_params(rows: torch.Tensor, spec: QuantSpec) -> RowParams:
    """OCP MX rule: shared exponent = floor(log2(amax)) - emax(element); NaN/Inf amax -> NaN byte."""
    et = spec.element
    amax = absmax(rows)
    exp = floor_log2(amax) - et.emax
    bits = e8m0_from_exponent(exp)
    bits = torch.where(amax == 0, torch.zeros_like(bits), bits)  # smallest scale for all-zero blocks
    bits = torch.where(torch.isfinite(amax), bits, torch.full_like(bits, E8M0_NAN))
    scale = decode_e8m0(bits)
    if not et.is_float:
        scale = scale * int_unit(et)  # exact: a power of two times a power of two
    return RowParams(scale, scale_bits=bits)


FP8_E4M3_MAX = 448.0


def _e4m3_params(rows: torch.Tensor, spec: QuantSpec) -> RowParams:
    """NVFP4: tensor scale amax/(emax_elem * 448); block scale E4M3(block_amax / (emax_elem * ts))."""
    et = spec.element
    emax_val = et.max_value
    amax = absmax(rows)
    ts = amax.amax() / (emax_val * FP8_E4M3_MAX)
    ts = torch.where(ts == 0, torch.ones_like(ts), ts).to(torch.float32)
    bits = encode_float(amax / (emax_val * ts), ElementType.FP8_E4M3)
    scale = decode_float(bits, ElementType.FP8_E4M3) * ts
    return RowParams(scale, scale_bits=bits, tensor_scale=ts)


def row_params(rows: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None = None) -> RowParams:
    """Scales (and zero points) of each row of ``rows`` (float32 ``[rows, elements]``)."""
    st = spec.scale_type
    if st is ScaleType.E8M0:
        return _e8m0_params(rows, spec)
    if st is ScaleType.E4M3:
        return _e4m3_params(rows, spec)
    return _float32_params(rows, spec, valid)
