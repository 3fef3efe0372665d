"""GPTQ (Frantar et al., 2023): column-by-column rounding with Cholesky error feedback.

Canonical layout and formats as `qpass.quant.quantized_weight` describes: ``W`` is ``[out, in]``,
``H = XᵀX`` the ``[in, in]`` second moment of the layer's inputs (any positive multiple works).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qpass.errors import ConfigError, PreconditionError
from qpass.formats import Granularity, QuantSpec, ScaleType, compute_scale_zero_point
from qpass.formats.quantize import _encode_tile
from qpass.formats.scales import fake_rows
from qpass.quant.quantized_weight import (
    QuantizedWeight,
    check_hessian,
    check_spec,
    check_weight,
    one_cpu_thread,
)

__all__ = ["gptq"]


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """The same format with one scale per row of a ``[out, group]`` slice."""
    return spec.replace(granularity=Granularity.PER_CHANNEL, axis=0, group_size=None, pad_tail=False)


def _params_layout(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[out, n_groups]`` and zero points (asymmetric only) of ``w`` under ``spec``."""
    scale, zp = compute_scale_zero_point(w, spec)
    out = w.shape[0]
    scale = scale.reshape(scale.shape[0], -1).expand(out, -1).contiguous()
    if zp is None or spec.symmetric:
        return scale, None
    return scale, zp.reshape(zp.shape[0], -1).expand(out, -1).contiguous()


def _check_int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        msg = f"argument '{name}' must be an int >= {lo}, got {value!r}"
        raise ConfigError(msg)
    return value


def _inverse_cholesky(hf: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (``Uᵀ U = (H + λI)⁻¹``), float32.

    Takes ``hf = J H J``, ``H`` with its rows and columns reversed (``J`` the reversal
    permutation; the caller builds it in the same indexing as the act-order permutation),
    as a float64 matrix it hands over: it is dampened in place and freed early, since for a
    large layer (11008 inputs) each float64 copy is about 1 GB. Without forming the inverse:
    ``J H J = L Lᵀ`` gives ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper
    triangular, so ``U = flip(L⁻¹)``: one Cholesky and one triangular solve (about half the
    flops of inverting then factorising again). ``λ = damp * mean(diag H)``; if the
    factorisation fails (H badly conditioned) the dampening is raised tenfold, up to three times.
    """
    n = hf.shape[0]
    diag = hf.diagonal()
    mean_diag = float(diag.mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    lam = damp * scale
    added = 0.0
    for _ in range(4):
        diag.add_(lam - added)
        added = lam
        chol, info = torch.linalg.cholesky_ex(hf)
        if int(info) == 0:
            del hf, diag
            inv = torch.eye(n, dtype=chol.dtype, device=chol.device)
            torch.linalg.solve_triangular(chol, inv, upper=False, out=inv)
            del chol
            return inv.to(torch.float32).flip(0, 1)
        del chol
        lam *= 10.0
    msg = f"gptq: H + damp*mean(diag)*I is not positive definite even at damp={lam / 10 / scale:.3g}"
    raise PreconditionError(msg)


def gptq(
    W: Any,
    H: Any,
    spec: QuantSpec | str,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ (Frantar et al., 2023): column-by-column rounding with Cholesky error feedback.

    Minimises ``trace((W - W_q) H (W - W_q)ᵀ)``: each column is rounded with its group's
    scale and its error, divided by the inverse-Hessian pivot, is spread over the
    not-yet-quantized columns (within a block of ``block_size`` columns immediately,
    to later columns lazily once per block: one matmul per block).

    * ``damp``: ``damp * mean(diag H)`` is added to the diagonal (> 0 required).
    * Dead columns (``H_jj == 0``: an input channel the calibration never saw) get
      ``H_jj = 1``; being uncorrelated they are rounded to nearest without feeding error
      forward. (The reference implementation zeroes them; keeping them keeps the weight
      sensible for inputs the calibration missed.)
    * ``act_order``: columns are processed by descending ``H_jj`` (stable order on ties).
    * Groups: with ``static_groups=False`` a group's scales are computed when its first
      column is reached, from the current (error-updated) weights of the group's columns;
      with act-order, groups are consecutive in the processing order, so
      ``g_idx[perm[k]] = k // group_size``. With ``static_groups=True`` all scales come
      from the original ``W`` and ``g_idx[j] = j // group_size`` (sequential, no
      reordering needed at inference). Per-channel / per-tensor specs have one group.
    * The spec's clip method applies to each group (``clip=mse`` searches the clip ratio
      on the updated weights). NVFP4 (E4M3 scales) has a tensor-wide scale, so it needs
      ``static_groups=True``.
    * ``keep`` (bool ``[out, in]``, optional): weights kept in float (outlier protection).
      They take no part in their group's scale (counted as zero) and are not rounded:
      each keeps its error-updated value (zero error, nothing fed forward; SpQR's choice),
      returned in ``kept``; their codes are the zero code, so ``dequantized() + kept`` is
      the result.
    """
    w = check_weight(W)
    n_out, n_in = w.shape
    h = check_hessian(H, n_in)
    spec, gs = check_spec(spec, n_in)
    block_size = _check_int(block_size, "block_size", 1)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        msg = f"argument 'damp' must be a finite number > 0, got {damp!r}"
        raise ConfigError(msg)
    dynamic = not static_groups and spec.granularity is not Granularity.PER_TENSOR
    if dynamic and spec.scale_type is ScaleType.E4M3:
        msg = "gptq: scale_type=e4m3 (NVFP4) has a tensor-wide scale; use static_groups=True"
        raise ConfigError(msg)

    dev = w.device
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != w.shape:
            msg = f"argument 'keep' must be a bool tensor of W's shape {list(w.shape)}"
            raise ConfigError(msg)
        keep = keep.to(dev)
    work = w.detach().to(torch.float32).clone()
    h_diag = torch.diagonal(h.detach()).to(torch.float64)
    dead = h_diag == 0
    h_diag = torch.where(dead, torch.ones_like(h_diag), h_diag)

    perm = None
    order = torch.arange(n_in, device=h.device)
    if act_order:
        perm = torch.argsort(h_diag, descending=True, stable=True)
        work = work[:, perm]
        order = perm
        if keep is not None:
            keep = keep[:, perm]
    rev = order.flip(0)  # H in processing order, reversed for _inverse_cholesky: one gather
    hf = h.detach()[rev][:, rev].to(torch.float64)
    dead_rev = dead[rev]
    hf[dead_rev, dead_rev] = 1.0
    u = _inverse_cholesky(hf, float(damp))
    del hf

    n_groups = -(-n_in // gs)  # the last group may be short
    if dynamic:
        scales = torch.empty(n_out, n_groups, dtype=torch.float32, device=dev)
        zp_dtype = torch.float32 if spec.float_zero_point else torch.uint8
        zps = None if spec.symmetric or spec.element.is_float else torch.empty_like(scales, dtype=zp_dtype)
        # group of each processed (permuted) column
        g_of_pos = torch.arange(n_in, device=dev) // gs
        row_spec = _row_spec(spec)
    else:
        w_scales = (
            w.to(torch.float32) if keep is None else w.to(torch.float32).masked_fill(keep.to(w.device), 0.0)
        )
        scales, zps = _params_layout(w_scales, spec)
        g_orig = torch.arange(n_in, device=dev) // gs
        g_of_pos = g_orig if perm is None else g_orig[perm]
        g_list = g_of_pos.tolist()  # one host list, not a device sync per column

    q_all = torch.empty_like(work)
    col_scale = col_zp = None
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = work[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        with one_cpu_thread(dev):
            for i in range(i2 - i1):
                j = i1 + i
                if dynamic:
                    if j % gs == 0:  # group start: scales from the group's current weights
                        g = j // gs
                        end = j + gs
                        cur = w1[:, i : min(i2, end) - i1]
                        if end > i2:  # the group reaches past this block: apply its pending updates
                            tail = work[:, i2:end] - err1[:, :i] @ u[i1:j, i2:end]
                            cur = torch.cat([cur, tail], dim=1)
                        if keep is not None:
                            cur = cur.masked_fill(keep[:, j : j + cur.shape[1]], 0.0)
                        s, z = _params_layout(cur, row_spec)
                        col_scale = scales[:, g] = s[:, 0]
                        if zps is not None:
                            col_zp = zps[:, g] = z[:, 0]
                else:
                    g = g_list[j]
                    col_scale = scales[:, g]
                    col_zp = None if zps is None else zps[:, g]
                col = w1[:, i]
                q = fake_rows(col[:, None], col_scale, col_zp, spec)[:, 0]
                if keep is not None:
                    q = torch.where(keep[:, j], col, q)
                q_all[:, j] = q
                e = (col - q) / u1[i, i]
                err1[:, i] = e
                if i + 1 < i2 - i1:
                    w1[:, i + 1 :] -= e[:, None] * u1[i, i + 1 :][None, :]
        if i2 < n_in:
            work[:, i2:] -= err1 @ u[i1:i2, i2:]

    # back to the original column order
    kept = None
    if keep is not None:  # kept weights get the zero code and are returned apart, unrounded
        kept = torch.where(keep, q_all, torch.zeros_like(q_all))
        q_all = q_all.masked_fill(keep, 0.0)
    if perm is not None:
        inv = torch.argsort(perm)
        q_all = q_all[:, inv]
        kept = None if kept is None else kept[:, inv]
        g_idx = g_of_pos[inv]
    else:
        g_idx = g_of_pos
    g_idx = g_idx.to(torch.int32)
    gl = g_idx.to(torch.int64)
    s_full = scales[:, gl]
    z_full = None if zps is None else zps[:, gl]
    codes = _encode_tile(
        q_all.reshape(-1, 1), s_full.reshape(-1), None if z_full is None else z_full.reshape(-1), spec
    ).reshape(n_out, n_in)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zero_points=zps,
        group_size=gs,
        g_idx=g_idx,
        perm=perm,
        spec=spec,
        kept=kept,
    )
