"""Round-to-nearest weight quantization: plain RTN (optionally with the weight-MSE clip search),
AdaDim's groups along the output rows, and the clip search on the layer's output error.

Canonical layout and formats as `qpass.quant.quantized_weight` describes: ``W`` is ``[out, in]``,
``H = XᵀX`` the ``[in, in]`` second moment of the layer's inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qpass.errors import ConfigError
from qpass.formats import ClipMethod, QuantSpec, ScaleType, quantize
from qpass.quant.quantized_weight import QuantizedWeight, check_hessian, check_spec, check_weight

__all__ = ["rtn", "rtn_out_groups", "rtn_output_clip"]


def _sequential_g_idx(n_in: int, gs: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n_in, device=device) // gs).to(torch.int32)


def rtn_out_groups(W: Any, spec: QuantSpec | str, *, clip_search: bool = False) -> QuantizedWeight:
    """AdaDim's other dimension: RTN with groups of ``group_size`` output rows in each input column
    (``rtn`` of ``W^T``, stored back in the ``[out, in]`` layout with ``[out_groups, in]`` scales).
    """
    w = check_weight(W)
    t = rtn(w.T.contiguous(), spec, clip_search=clip_search)
    zp = None if t.zero_points is None else t.zero_points.T.contiguous()
    return QuantizedWeight(
        codes=t.codes.T.contiguous(),
        scales=t.scales.T.contiguous(),
        zero_points=zp,
        group_size=t.group_size,
        g_idx=torch.zeros(w.shape[1], dtype=torch.int32, device=w.device),
        perm=None,
        spec=t.spec,
        group_axis="out",
    )


def rtn(W: Any, spec: QuantSpec | str, *, clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest with the spec's scales (any integer or float element, any scale type).

    ``clip_search=True`` replaces the spec's clip method by ``ClipMethod.MSE``: per group
    (or per channel) a grid search of the clip ratio that minimises the group's squared
    rounding error (the spec's ``mse_grid``/``mse_min_ratio``). MX/NVFP4 scales are
    defined from the block absmax, so ``clip_search`` needs ``scale_type=float32``.
    """
    w = check_weight(W)
    spec, gs = check_spec(spec, w.shape[1])
    if clip_search:
        if spec.scale_type is not ScaleType.FLOAT32:
            msg = f"argument 'clip_search' needs scale_type=float32, got {spec.scale_type.value}"
            raise ConfigError(msg)
        spec = spec.replace(clip=ClipMethod.MSE)
    qt = quantize(w, spec)
    out = w.shape[0]
    scales = qt.scale.reshape(qt.scale.shape[0], -1).expand(out, -1).to(torch.float32).contiguous()
    zp = None
    if qt.zero_point is not None and not spec.symmetric:
        zp = qt.zero_point.reshape(qt.zero_point.shape[0], -1).expand(out, -1).contiguous()
    return QuantizedWeight(
        codes=qt.codes,
        scales=scales,
        zero_points=zp,
        group_size=gs,
        g_idx=_sequential_g_idx(w.shape[1], gs, w.device),
        perm=None,
        spec=spec,
        tensor_scale=None if qt.tensor_scale is None else float(qt.tensor_scale),
    )


# Output-error clip search, as AWQ's auto-clip: 20 ratios from 1 down to 0.5.
OUTPUT_CLIP_GRID = 20
OUTPUT_CLIP_MIN_RATIO = 0.5


def _group_ranges(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of ``w`` (a short last group included), each ``[out, n_groups]``."""
    idx = g_idx.to(torch.int64).expand(w.shape[0], -1)
    lo = torch.zeros(w.shape[0], n_groups, dtype=w.dtype).scatter_reduce_(
        1, idx, w, "amin", include_self=False
    )
    hi = torch.zeros(w.shape[0], n_groups, dtype=w.dtype).scatter_reduce_(
        1, idx, w, "amax", include_self=False
    )
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def rtn_output_clip(W: Any, spec: QuantSpec | str, H: Any) -> QuantizedWeight:
    """RTN whose per-group clip ratio minimises the layer's OUTPUT error on calibration inputs.

    The weight-MSE search (``rtn(clip_search=True)``) treats every column alike, so it clips
    the few large weights that read massive activation channels (super weights) and ruins the
    layer. Here the error of a group is ``E_g H_gg E_gᵀ`` with ``H = XᵀX`` (the group's diagonal
    block; the whole matrix for per-channel scales), as AWQ's auto-clip measures it on samples.
    A ratio ``r`` clips the group to ``[r·min, r·max]`` before absmax/min-max RTN, so the result
    is plain round-to-nearest with scales ``r`` times the absmax ones.
    """
    w = check_weight(W)
    spec, gs = check_spec(spec, w.shape[1])
    if spec.scale_type is not ScaleType.FLOAT32:
        msg = f"output clip search needs scale_type=float32, got {spec.scale_type.value}"
        raise ConfigError(msg)
    h = check_hessian(H, w.shape[1]).to(torch.float32)
    g_idx = _sequential_g_idx(w.shape[1], gs, w.device).to(torch.int64)
    n_groups = int(g_idx.max()) + 1
    h_block = h * (g_idx[:, None] == g_idx[None, :])  # error couples columns of one group only
    lo, hi = _group_ranges(w, g_idx, n_groups)
    best_err = torch.full((w.shape[0], n_groups), math.inf, dtype=torch.float64)
    best_ratio = torch.ones(w.shape[0], n_groups)
    for ratio in torch.linspace(1.0, OUTPUT_CLIP_MIN_RATIO, OUTPUT_CLIP_GRID).tolist():
        clipped = torch.minimum(torch.maximum(w, ratio * lo[:, g_idx]), ratio * hi[:, g_idx])
        e = rtn(clipped, spec).dequantized() - w
        err = torch.zeros_like(best_err).index_add_(1, g_idx, ((e @ h_block) * e).to(torch.float64))
        better = err < best_err  # ties keep the larger ratio
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    r = best_ratio[:, g_idx]
    return rtn(torch.minimum(torch.maximum(w, r * lo[:, g_idx]), r * hi[:, g_idx]), spec)
