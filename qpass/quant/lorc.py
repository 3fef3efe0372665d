"""A layer's output error under a quantized weight, and ZeroQuant-V2's low-rank compensation
(LoRC) of that error.

Canonical layout as `qpass.quant.quantized_weight` describes: ``W`` is ``[out, in]``,
``H = XᵀX`` the ``[in, in]`` second moment of the layer's inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from qpass.errors import ConfigError, PreconditionError
from qpass.quant.quantized_weight import as_matrix, check_hessian, check_weight, one_cpu_thread

__all__ = ["layer_error", "low_rank_compensation"]


def layer_error(W: Any, W_q: Any, H: Any) -> float:
    """Relative output error on calibration data: ``tr(E H Eᵀ) / tr(W H Wᵀ)``, ``E = W - W_q``.

    With ``H = XᵀX`` this is ``||X Eᵀ||² / ||X Wᵀ||²``: the squared error of the layer's
    outputs relative to their energy. Computed in float64.
    """
    w = check_weight(W).to(torch.float64)
    wq = as_matrix(W_q, "W_q").to(torch.float64)
    if wq.shape != w.shape:
        msg = f"argument 'W_q' must have W's shape {list(w.shape)}, got {list(wq.shape)}"
        raise ConfigError(msg)
    h = check_hessian(H, w.shape[1]).to(torch.float64)
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
    w = check_weight(W)
    wq = as_matrix(W_q, "W_q")
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
    with one_cpu_thread(e.device):
        if H is not None:
            h = check_hessian(H, n_in).to(torch.float64)
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
