"""Outlier protection: the few weights that move a layer's output most, split off as a sparse
float part (The Super Weight, SpQR, QuantEase's outlier-aware criterion).

Canonical layout as `qpass.quant.quantized_weight` describes: ``W`` is ``[out, in]``,
``H = XᵀX`` the ``[in, in]`` second moment of the layer's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qpass.errors import ConfigError
from qpass.formats import QuantSpec
from qpass.quant.quantized_weight import check_hessian, check_weight
from qpass.quant.rtn import rtn

__all__ = ["OutlierSplit", "protect_outliers"]


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
    w = check_weight(W)
    n_out, n_in = w.shape
    h = check_hessian(H, n_in)
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
