"""Dense rotations (seeded random orthogonal, KLT from a channel covariance) and the measurements
that show why a rotation helps (outlier ratio, error of the quantized matmul).

Pure torch, no graphs. A rotation ``Q`` acts on the *last* (channel) axis from the right:
``x -> x @ Q``, and a linear ``y = x W^T`` stays exact as ``y = (x Q)(W Q)^T`` because
``Q Q^T = I``. Hadamard matrices are in `qpass.math.hadamard`, DuQuant's block rotations in
`qpass.math.duquant`.
"""

from __future__ import annotations

import math

import torch

from qpass.errors import ConfigError
from qpass.formats import QuantSpec, fake_quantize
from qpass.math.checks import check_float_dtype, check_order, small_op_threads
from qpass.math.hadamard import hadamard

__all__ = [
    "channel_covariance",
    "klt_rotation",
    "outlier_ratio",
    "random_orthogonal",
    "rotate_error",
]


def random_orthogonal(
    n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]``: QR of a seeded float64 Gaussian, columns sign-fixed so
    that ``diag(R) > 0`` (makes Q unique, hence deterministic for a seed).
    """
    n = check_order(n)
    check_float_dtype(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    with small_op_threads(n):
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- KLT


def channel_covariance(x: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Covariance ``[n, n]`` (float64) of the channels of ``x[..., n]`` over all leading axes."""
    v = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if center:
        v = v - v.mean(0, keepdim=True)
    return v.T @ v / max(v.shape[0], 1)


def klt_rotation(cov: torch.Tensor, *, with_hadamard: bool = False) -> torch.Tensor:
    """KLT rotation (float64 ``[n, n]``): eigenvectors of the channel covariance as columns.

    Columns are sorted by eigenvalue, largest first, and each column's sign is fixed so that its
    largest-magnitude entry is positive (deterministic). ``x @ Q`` has decorrelated channels
    with variances = eigenvalues, i.e. KLT alone *concentrates* energy in the first channels.
    ``with_hadamard=True`` returns ``Q @ hadamard(n)`` (MambaQuant's KLT-enhanced rotation): the
    decorrelated channels are then mixed evenly, and every output channel gets the same variance
    ``trace(cov) / n`` -- variance-aligned channels, which per-tensor scales like.
    """
    if not isinstance(cov, torch.Tensor) or cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        msg = f"cov must be a square [n, n] tensor, got {getattr(cov, 'shape', type(cov).__name__)}"
        raise ConfigError(msg)
    c = cov.to(torch.float64)
    if not torch.isfinite(c).all():
        msg = "cov has non-finite entries"
        raise ConfigError(msg)
    with small_op_threads(c.shape[0]):
        evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    q = evecs[:, torch.argsort(evals, descending=True, stable=True)]
    cols = torch.arange(q.shape[1])
    q = q * torch.sign(q[q.abs().argmax(0), cols])
    if with_hadamard:
        q = q @ hadamard(q.shape[0])
    return q


# --------------------------------------------------------------------------- measurements


def outlier_ratio(x: torch.Tensor, dim: int = -1) -> float:
    """Max channel absmax / median channel absmax, channels along ``dim`` (inf if the median is 0)."""
    amax = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]).abs().amax(0).to(torch.float64)
    med = float(amax.median())
    return float(amax.max()) / med if med > 0 else math.inf


def rotate_error(
    x: torch.Tensor,
    w: torch.Tensor,
    q: torch.Tensor | None,
    spec: QuantSpec,
    weight_spec: QuantSpec | None = None,
) -> float:
    """Relative error ``||Q(x Q) Q(W Q)^T - x W^T||_F / ||x W^T||_F`` of the quantized matmul.

    ``x [..., n]`` activations, ``w [out, n]`` weight, ``q [n, n]`` the rotation (None: none);
    activations fake-quantized with ``spec``, weights with ``weight_spec`` (default ``spec``) via
    `qpass.formats.fake_quantize` on float32 tensors; the matmuls run in float64.
    ``-20 log10(error)`` is the SQNR in dB.
    """
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    w64 = w.to(torch.float64)
    ref = x64 @ w64.T
    if q is not None:
        q64 = q.to(torch.float64)
        x64, w64 = x64 @ q64, w64 @ q64
    xq = fake_quantize(x64.float(), spec).to(torch.float64)
    wq = fake_quantize(w64.float(), weight_spec or spec).to(torch.float64)
    return float((xq @ wq.T - ref).norm() / ref.norm())
