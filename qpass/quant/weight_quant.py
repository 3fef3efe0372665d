"""One linear's weight through a recipe's weight config: protection, RTN/GPTQ, low-rank compensation.

The steps compose in this order because each one corrects what the previous left:

1. ``protect``: pick the weights whose rounding moves the output most
   (``protect_outliers``); they are excluded from their group's scale and kept in float,
   unrounded: RTN keeps their original values, GPTQ their error-updated values (zero
   error on them, as SpQR does).
2. ``algo``: ``gptq`` (error feedback around the kept weights) or RTN (``rtn`` and ``awq``:
   AWQ's scale search already ran as a graph pass, so its weights are rounded to nearest).
3. ``lorc_rank``: a rank-r correction of what remains, ``W - (W_q + sparse)``, fitted to the
   layer's output error when ``X^T X`` is known (else plain SVD, ZeroQuant-V2's choice).

The effective weight is ``dequant(codes) + U @ V + sparse``; the torch lowering applies the
two corrections as separate small terms (``qpass.lowering.torch_corrections``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.errors import PreconditionError
from qpass.formats import QuantSpec
from qpass.qconfig import WeightQuantConfig
from qpass.quant.gptq import gptq
from qpass.quant.lorc import layer_error, low_rank_compensation
from qpass.quant.protect import protect_outliers
from qpass.quant.quantized_weight import QuantizedWeight
from qpass.quant.rtn import rtn, rtn_out_groups, rtn_output_clip


@dataclass(frozen=True, eq=False)
class LayerWeight:
    """A quantized weight plus its optional float corrections (all ``[out, in]`` canonical)."""

    qweight: QuantizedWeight
    lorc_u: torch.Tensor | None = None  # [out, r]
    lorc_v: torch.Tensor | None = None  # [r, in]
    outlier_rows: torch.Tensor | None = None  # int64 [k]
    outlier_cols: torch.Tensor | None = None  # int64 [k]
    outlier_values: torch.Tensor | None = None  # float32 [k], the kept (unrounded) values

    def sparse_dense(self) -> torch.Tensor | None:
        """The kept weights as a dense ``[out, in]`` tensor (zero elsewhere), or None."""
        if self.outlier_values is None:
            return None
        out = torch.zeros(self.qweight.shape, dtype=torch.float32)
        out[self.outlier_rows, self.outlier_cols] = self.outlier_values
        return out

    def effective(self) -> torch.Tensor:
        """float32 ``dequant(codes) + U @ V + sparse``: the weight the lowered layer applies."""
        w = self.qweight.dequantized()
        dense = self.sparse_dense()
        if dense is not None:
            w = w + dense
        if self.lorc_u is not None:
            w = w + self.lorc_u @ self.lorc_v
        return w


def _protect_count(cfg: WeightQuantConfig, numel: int) -> int:
    p = cfg.protect
    if isinstance(p, float):
        return max(1, round(p * numel)) if p > 0 else 0
    return min(int(p), numel)


def quantize_weight(
    w: torch.Tensor, cfg: WeightQuantConfig, spec: QuantSpec, xtx: torch.Tensor | None, *, layer: str = "?"
) -> LayerWeight:
    """Quantize a canonical ``[out, in]`` weight as ``cfg`` says; ``xtx`` is the layer's ``X^T X`` or None."""
    if xtx is None and (cfg.algo == "gptq" or cfg.protect != 0):
        msg = (
            f"layer '{layer}': weights.algo=gptq / weights.protect need calibration X^T X, none was collected"
        )
        raise PreconditionError(msg)
    if cfg.group_axis != "in":
        return LayerWeight(adaptive_dim(w, cfg, spec, xtx, layer=layer))
    k = _protect_count(cfg, w.numel())
    keep = split = None
    if k:
        split = protect_outliers(
            w,
            xtx,
            count=k,
            criterion=cfg.protect_criterion,
            spec=spec if cfg.protect_criterion == "error" else None,
        )
        keep = torch.zeros(w.shape, dtype=torch.bool)
        keep[split.rows, split.cols] = True
    if cfg.algo == "gptq":
        qw = gptq(
            w, xtx, spec, act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp, keep=keep
        )
    elif cfg.clip_search and cfg.clip_objective == "output":
        qw = rtn_output_clip(w if split is None else split.W_rest, spec, xtx)
    else:
        qw = rtn(w if split is None else split.W_rest, spec, clip_search=cfg.clip_search)
    values = None
    if split is not None:  # RTN keeps the original weights; GPTQ their error-updated values
        values = split.values if qw.kept is None else qw.kept[split.rows, split.cols]
    result = LayerWeight(
        qw,
        outlier_rows=None if split is None else split.rows,
        outlier_cols=None if split is None else split.cols,
        outlier_values=values,
    )
    if cfg.lorc_rank > 0:
        rank = min(cfg.lorc_rank, *w.shape)
        u, v = low_rank_compensation(w, result.effective(), rank, xtx)
        result = LayerWeight(qw, u, v, result.outlier_rows, result.outlier_cols, result.outlier_values)
    return result


def adaptive_dim(
    w: torch.Tensor, cfg: WeightQuantConfig, spec: QuantSpec, xtx: torch.Tensor | None, *, layer: str = "?"
) -> QuantizedWeight:
    """AdaDim: RTN groups along the output rows ("out"), or per layer whichever of the two group
    dimensions gives the lower output error tr(dW X^T X dW^T) / tr(W X^T X W^T) ("auto").
    A layer whose output count the group does not divide keeps the usual groups.
    """
    if w.shape[0] % (cfg.group or 1):
        return rtn(w, spec, clip_search=cfg.clip_search)
    out = rtn_out_groups(w, spec, clip_search=cfg.clip_search)
    if cfg.group_axis == "out":
        return out
    if xtx is None:
        msg = f"layer '{layer}': weights.group_axis=auto needs calibration X^T X, none was collected"
        raise PreconditionError(msg)
    usual = rtn(w, spec, clip_search=cfg.clip_search)
    return out if layer_error(w, out.dequantized(), xtx) < layer_error(w, usual.dequantized(), xtx) else usual
