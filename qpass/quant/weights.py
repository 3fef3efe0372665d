"""Weight quantizers on plain tensors: RTN, GPTQ, low-rank compensation, outlier protection.

Backend-neutral math only (the graph integration reads weights through the graph view
and calls these). Canonical layout: ``W`` is ``[out, in]`` with the reduction axis last
(a ``torch.nn.Linear`` weight; the graph view's ``WeightRef`` hides Gemm ``transB`` and
MatMul sides), and ``H = XᵀX`` is the ``[in, in]`` second-moment accumulator of the
layer's inputs gathered by calibration (any positive multiple works: every algorithm
here is invariant to scaling ``H``).

Number formats come from ``qpass.formats``: a ``QuantSpec`` says the element type and who
shares a scale; its ``PER_GROUP`` axis must be the last (``in``) axis and its
``PER_CHANNEL`` axis the first (``out``), so a group is ``group_size`` consecutive input
channels of one output row (ONNX blocked / MatMulNBits layout). Scales, zero points and
rounding are the formats' own (``compute_scale_zero_point``, ``quantize``), never
re-derived here.

The result, ``QuantizedWeight``, carries codes in the ORIGINAL column order, scales
``[out, n_groups]`` and ``g_idx`` (group of each input channel), so that
``W_q[o, j] = (value(codes[o, j]) - zp[o, g_idx[j]]) * scales[o, g_idx[j]]``: the formula
of ONNX Runtime's ``MatMulNBits`` with its ``g_idx`` input (int32 ``[K]``; the contrib-op
spec marks it deprecated, ORT 1.32's CPU kernel still applies it). Without act-order,
``g_idx[j] == j // group_size``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from qpass.errors import ConfigError, PreconditionError
from qpass.formats import (
    ClipMethod,
    Granularity,
    QuantizedTensor,
    QuantSpec,
    ScaleType,
    compute_scale_zero_point,
    get_format,
    quantize,
)
from qpass.formats.quantize import _encode_tile, code_values
from qpass.formats.scales import fake_rows
from qpass.threads import single_thread

__all__ = [
    "OutlierSplit",
    "QuantizedWeight",
    "gptq",
    "layer_error",
    "rtn_out_groups",
    "low_rank_compensation",
    "protect_outliers",
    "rtn",
    "rtn_output_clip",
]


# ------------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: what lowering needs, in the original column order.

    * ``codes``: ``[out, in]``, the formats' code convention (int8 signed values for
      symmetric integers, uint8 for asymmetric integers, uint8 bit patterns for floats).
    * ``scales``: float32 ``[out, n_groups]``, the effective scale (E8M0/E4M3 scales are
      stored decoded; they are exact powers of two / FP8 values times the tensor scale).
    * ``zero_points``: uint8 ``[out, n_groups]`` for asymmetric integers, else None.
    * ``group_size``: input channels per group (``in`` for per-channel and per-tensor).
    * ``g_idx``: int32 ``[in]``, the group of each input channel (MatMulNBits ``g_idx``).
    * ``perm``: the act-order processing order (``perm[k]`` = the k-th column quantized),
      or None. Informational: codes and scales are already in the original order.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    spec: QuantSpec
    kept: torch.Tensor | None = None  # gptq(keep=...): float32 [out, in], the kept weights' values, else 0
    tensor_scale: float | None = None  # NVFP4: scales = e4m3(scale byte) * tensor_scale (kernels re-encode)
    # "out" (AdaDim): groups of `group_size` output rows per input column; scales and zero
    # points are then [out_groups, in] and g_idx is unused
    group_axis: str = "in"

    @property
    def shape(self) -> torch.Size:
        """``[out, in]``."""
        return self.codes.shape

    @property
    def n_groups(self) -> int:
        """Number of scale groups per output row."""
        return int(self.scales.shape[1])

    @property
    def sequential_groups(self) -> bool:
        """True when ``g_idx[j] == j // group_size`` (plain blocked layout, no ``g_idx`` needed)."""
        if self.group_axis == "out":
            return True
        j = torch.arange(self.g_idx.numel(), device=self.g_idx.device)
        return bool(torch.equal(self.g_idx.to(torch.int64), j // self.group_size))

    def dequantized(self) -> torch.Tensor:
        """float32 ``W_q`` ``[out, in]`` in the original column order (the MatMulNBits formula)."""
        if self.group_axis == "out":
            g = torch.arange(self.codes.shape[0], device=self.codes.device) // self.group_size
            v = code_values(self.codes, self.spec.element)
            if self.zero_points is not None:
                v = v - self.zero_points[g, :].to(torch.float32)
            return v * self.scales[g, :]
        g = self.g_idx.to(torch.int64)
        v = code_values(self.codes, self.spec.element)
        if self.zero_points is not None:
            v = v - self.zero_points[:, g].to(torch.float32)
        return v * self.scales[:, g]

    def to_quantized_tensor(self) -> QuantizedTensor:
        """The formats' ``QuantizedTensor`` (for ``.pack()``), when groups are sequential.

        Needs float32 scales (MX/NVFP4 scale bytes are not kept here) and
        ``sequential_groups``; act-order with dynamic groups needs ``g_idx`` instead.
        """
        if self.spec.scale_type is not ScaleType.FLOAT32:
            msg = f"to_quantized_tensor needs scale_type=float32, got {self.spec.scale_type.value}"
            raise PreconditionError(msg)
        if self.group_axis == "out":
            msg = (
                "to_quantized_tensor: groups run along the output rows (group_axis out); no blocked-K layout"
            )
            raise PreconditionError(msg)
        if not self.sequential_groups:
            msg = "to_quantized_tensor: g_idx is not sequential (act-order with dynamic groups); lower with g_idx"
            raise PreconditionError(msg)
        g = self.spec.granularity
        scale, zp = self.scales, self.zero_points
        if g is Granularity.PER_TENSOR:
            scale = scale[:1, :1]
            zp = None if zp is None else zp[:1, :1]
        return QuantizedTensor(codes=self.codes, scale=scale.contiguous(), spec=self.spec, zero_point=zp)


# ------------------------------------------------------------------------------ validation


def _matrix(x: Any, name: str) -> torch.Tensor:
    if hasattr(x, "__array__") and not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        msg = f"argument '{name}' must be a torch.Tensor or numpy array, got {type(x).__name__}"
        raise ConfigError(msg)
    if not x.is_floating_point():
        msg = f"argument '{name}' must be a floating-point tensor, got dtype {x.dtype}"
        raise ConfigError(msg)
    if x.ndim != 2:
        msg = f"argument '{name}' must be 2-D, got shape {list(x.shape)}"
        raise ConfigError(msg)
    if not bool(torch.isfinite(x).all()):
        msg = f"argument '{name}' contains NaN or Inf"
        raise ConfigError(msg)
    return x


def _weight(w: Any) -> torch.Tensor:
    w = _matrix(w, "W")
    if w.numel() == 0:
        msg = f"argument 'W' is empty (shape {list(w.shape)})"
        raise ConfigError(msg)
    return w


def _hessian(h: Any, n_in: int, name: str = "H") -> torch.Tensor:
    h = _matrix(h, name)
    if tuple(h.shape) != (n_in, n_in):
        msg = (
            f"argument '{name}' must be [in, in] = [{n_in}, {n_in}] for W [out, {n_in}], got {list(h.shape)}"
        )
        raise ConfigError(msg)
    return h


def _spec(spec: Any, n_in: int) -> tuple[QuantSpec, int]:
    """Check the spec against the canonical layout; return it with the group size."""
    if isinstance(spec, str):
        spec = get_format(spec)
    if not isinstance(spec, QuantSpec):
        msg = f"argument 'spec' must be a QuantSpec or a format name, got {type(spec).__name__}"
        raise ConfigError(msg)
    g = spec.granularity
    if g is Granularity.PER_TOKEN:
        msg = (
            "argument 'spec': granularity=per_token is dynamic (activations); weights need per_group/channel"
        )
        raise ConfigError(msg)
    if g is Granularity.PER_GROUP:
        if spec.resolved_axis(2) != 1:
            msg = f"argument 'spec': per_group weights are blocked along the last (in) axis, got axis={spec.axis}"
            raise ConfigError(msg)
        gs = int(spec.group_size)
        if n_in % gs and not spec.pad_tail:  # a short last group (576 = 4.5 x 128), as MatMulNBits pads it
            spec = spec.replace(pad_tail=True)
        return spec, gs
    if g is Granularity.PER_CHANNEL and spec.resolved_axis(2) != 0:
        msg = f"argument 'spec': per_channel weights have one scale per output row (axis=0), got axis={spec.axis}"
        raise ConfigError(msg)
    return spec, n_in


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


def _sequential_g_idx(n_in: int, gs: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n_in, device=device) // gs).to(torch.int32)


# ------------------------------------------------------------------------------ RTN


def rtn_out_groups(W: Any, spec: QuantSpec | str, *, clip_search: bool = False) -> QuantizedWeight:
    """AdaDim's other dimension: RTN with groups of ``group_size`` output rows in each input column
    (``rtn`` of ``W^T``, stored back in the ``[out, in]`` layout with ``[out_groups, in]`` scales).
    """
    w = _weight(W)
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
    w = _weight(W)
    spec, gs = _spec(spec, w.shape[1])
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
    w = _weight(W)
    spec, gs = _spec(spec, w.shape[1])
    if spec.scale_type is not ScaleType.FLOAT32:
        msg = f"output clip search needs scale_type=float32, got {spec.scale_type.value}"
        raise ConfigError(msg)
    h = _hessian(H, w.shape[1]).to(torch.float32)
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


# ------------------------------------------------------------------------------ GPTQ


def _one_cpu_thread(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """GPTQ's column loop and LoRC's small decompositions run on one thread (CPU tensors)."""
    return single_thread(device.type == "cpu")


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
    w = _weight(W)
    n_out, n_in = w.shape
    h = _hessian(H, n_in)
    spec, gs = _spec(spec, n_in)
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
        zps = None if spec.symmetric or spec.element.is_float else torch.empty_like(scales, dtype=torch.uint8)
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
        with _one_cpu_thread(dev):
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


# ------------------------------------------------------------------------------ error


def layer_error(W: Any, W_q: Any, H: Any) -> float:
    """Relative output error on calibration data: ``tr(E H Eᵀ) / tr(W H Wᵀ)``, ``E = W - W_q``.

    With ``H = XᵀX`` this is ``||X Eᵀ||² / ||X Wᵀ||²``: the squared error of the layer's
    outputs relative to their energy. Computed in float64.
    """
    w = _weight(W).to(torch.float64)
    wq = _matrix(W_q, "W_q").to(torch.float64)
    if wq.shape != w.shape:
        msg = f"argument 'W_q' must have W's shape {list(w.shape)}, got {list(wq.shape)}"
        raise ConfigError(msg)
    h = _hessian(H, w.shape[1]).to(torch.float64)
    e = w - wq
    num = float(((e @ h) * e).sum())
    den = float(((w @ h) * w).sum())
    if den <= 0:
        msg = "layer_error: tr(W H Wᵀ) is zero (zero weight or zero calibration inputs)"
        raise PreconditionError(msg)
    return num / den


# ------------------------------------------------------------------------------ LoRC


def _sym_sqrt(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H^(1/2)`` and ``H^(-1/2)`` of a symmetric PSD matrix, eigenvalues floored at damp*mean."""
    evals, evecs = torch.linalg.eigh(h)
    floor = damp * float(evals.clamp(min=0).mean()) or damp
    ev = evals.clamp(min=floor)
    root = (evecs * ev.sqrt()) @ evecs.T
    inv_root = (evecs * ev.rsqrt()) @ evecs.T
    return root, inv_root


def low_rank_compensation(
    W: Any, W_q: Any, rank: int, H: Any = None, *, damp: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroQuant-V2 LoRC: a rank-``rank`` correction ``U @ V`` of the error ``E = W - W_q``.

    Returns ``U [out, rank]`` and ``V [rank, in]`` (float32, singular values split evenly
    as ``sqrt(S)`` on both sides) so that ``W_q + U @ V`` approximates ``W``.

    * ``H=None``: truncated SVD of ``E``, the best rank-r approximation in Frobenius norm
      (Eckart–Young), so the weight error decreases monotonically with ``rank`` and
      ``rank = min(out, in)`` recovers ``W`` exactly.
    * ``H`` given (activation-weighted option): the best rank-r correction in the layer's
      OUTPUT error ``tr((E - UV) H (E - UV)ᵀ)``: SVD of ``E H^(1/2)``, truncated, mapped
      back with ``H^(-1/2)``. ``H``'s eigenvalues are floored at ``damp * mean`` so the
      inverse root exists; the output error is then monotone in ``rank`` too.
    """
    w = _weight(W)
    wq = _matrix(W_q, "W_q")
    if wq.shape != w.shape:
        msg = f"argument 'W_q' must have W's shape {list(w.shape)}, got {list(wq.shape)}"
        raise ConfigError(msg)
    n_out, n_in = w.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(n_out, n_in):
        msg = f"argument 'rank' must be an int in [0, min(out, in)] = [0, {min(n_out, n_in)}], got {rank!r}"
        raise ConfigError(msg)
    if not damp > 0:
        msg = f"argument 'damp' must be > 0, got {damp!r}"
        raise ConfigError(msg)
    e = w.to(torch.float64) - wq.to(torch.float64)
    inv_root = None
    with _one_cpu_thread(e.device):
        if H is not None:
            h = _hessian(H, n_in).to(torch.float64)
            root, inv_root = _sym_sqrt(h, float(damp))
            e = e @ root
        uu, s, vh = torch.linalg.svd(e, full_matrices=False)
    r = rank
    sq = s[:r].sqrt()
    u_mat = uu[:, :r] * sq
    v_mat = sq[:, None] * vh[:r]
    if inv_root is not None:
        v_mat = v_mat @ inv_root
    return u_mat.to(torch.float32), v_mat.to(torch.float32)


# ------------------------------------------------------------------------------ outliers


@dataclass(frozen=True, eq=False)
class OutlierSplit:
    """``W = W_rest + sparse``: a few weights kept in full precision, the rest to quantize.

    ``rows``/``cols`` (int64 ``[k]``) locate the protected entries and ``values`` (float32
    ``[k]``) are their original values; ``W_rest`` is ``W`` with them zeroed. Zero is on
    every grid (symmetric integers: code 0; asymmetric: the zero point; floats: +0), so
    ``quantize(W_rest)`` is (before GPTQ error feedback) zero there, and
    ``W_q_rest + dense()`` is the approximation of ``W``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    W_rest: torch.Tensor
    criterion: str

    @property
    def count(self) -> int:
        """Number of protected weights."""
        return int(self.values.numel())

    def sparse(self) -> torch.Tensor:
        """The correction as a torch sparse COO ``[out, in]`` tensor."""
        idx = torch.stack([self.rows, self.cols])
        return torch.sparse_coo_tensor(
            idx, self.values, tuple(self.W_rest.shape), check_invariants=True
        ).coalesce()

    def dense(self) -> torch.Tensor:
        """The correction as a dense ``[out, in]`` tensor (zero off the protected entries)."""
        out = torch.zeros_like(self.W_rest, dtype=torch.float32)
        out[self.rows, self.cols] = self.values
        return out

    def apply(self, W_q_rest: torch.Tensor) -> torch.Tensor:
        """``W_q_rest + sparse`` (dense float32)."""
        return W_q_rest.to(torch.float32) + self.dense()


_CRITERIA = ("magnitude", "error")


def protect_outliers(
    W: Any,
    H: Any,
    *,
    count: int | None = None,
    fraction: float | None = None,
    criterion: str = "magnitude",
    spec: QuantSpec | str | None = None,
) -> OutlierSplit:
    """Pick the weights that move the layer output most and split them off as a sparse FP part.

    Give exactly one of ``count`` (number of weights) or ``fraction`` (of all weights,
    rounded to nearest, at least 1 when > 0). Criteria (``H_jj / N`` is the mean square
    of input channel ``j``, so ``sqrt(H_jj)`` is its RMS up to a constant):

    * ``"magnitude"`` (The Super Weight; also SpQR/OWQ's sensitivity without a format):
      ``|W_ij| * sqrt(H_jj)``, the typical size of the weight's contribution to the
      output. Removing such a weight also shrinks its group's range, which lowers the
      rounding error of every other weight in the group.
    * ``"error"`` (QuantEase outlier-aware / OBS diagonal saliency; needs ``spec``):
      ``(W_ij - RTN(W)_ij)² * H_jj``, the weight's own quantization error weighted by
      its input's energy: the diagonal term of ``tr(E H Eᵀ)``.
    """
    w = _weight(W)
    n_out, n_in = w.shape
    h = _hessian(H, n_in)
    if (count is None) == (fraction is None):
        msg = "protect_outliers: give exactly one of arguments 'count' or 'fraction'"
        raise ConfigError(msg)
    total = n_out * n_in
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
            msg = f"argument 'count' must be an int in [0, {total}], got {count!r}"
            raise ConfigError(msg)
        k = count
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            msg = f"argument 'fraction' must be a number in [0, 1], got {fraction!r}"
            raise ConfigError(msg)
        k = max(1, round(fraction * total)) if fraction > 0 else 0
    if criterion not in _CRITERIA:
        msg = f"argument 'criterion' must be one of {_CRITERIA}, got {criterion!r}"
        raise ConfigError(msg)
    wf = w.detach().to(torch.float32)
    hd = torch.diagonal(h).detach().to(torch.float32).clamp(min=0)
    if criterion == "magnitude":
        score = wf.abs() * hd.sqrt()[None, :]
    else:
        if spec is None:
            msg = "protect_outliers: criterion='error' needs argument 'spec' (the format to round with)"
            raise ConfigError(msg)
        wq = rtn(wf, spec).dequantized()
        score = (wf - wq).square() * hd[None, :]
    flat = (
        torch.topk(score.reshape(-1), k, sorted=True).indices if k else score.new_empty(0, dtype=torch.long)
    )
    rows, cols = flat // n_in, flat % n_in
    values = wf[rows, cols].clone()
    rest = wf.clone()
    rest[rows, cols] = 0.0
    return OutlierSplit(rows=rows, cols=cols, values=values, W_rest=rest, criterion=criterion)
