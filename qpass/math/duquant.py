"""DuQuant's rotation (Lin et al. 2024): greedy block rotations, a zigzag permutation that
balances the large channels across blocks, and a second set of block rotations.

Pure torch, float64; the transform acts on the last (channel) axis, ``x -> x @ M`` with ``M``
orthogonal (see `duquant_matrix`), so it folds into a linear as any rotation does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qpass.errors import ConfigError
from qpass.math.checks import check_order, small_op_threads
from qpass.math.hadamard import hadamard, has_hadamard

__all__ = [
    "DuQuantRotation",
    "duquant_apply",
    "duquant_matrix",
    "duquant_rotation",
    "zigzag_permutation",
]


class DuQuantRotation(NamedTuple):
    """DuQuant's transform ``x -> ((x @ blockdiag(R1))[..., perm]) @ blockdiag(R2)``.

    perm: int64 ``[n]``; rotations: float64 ``[2, n // block, block, block]`` (R1 blocks, R2 blocks).
    """

    perm: torch.Tensor
    rotations: torch.Tensor


def _uniform_first_row(b: int) -> torch.Tensor:
    """An orthogonal b x b matrix whose first row is uniform (±1/sqrt(b)): Hadamard if one is
    constructible, else the Householder reflection swapping e_0 and ones/sqrt(b).
    """
    if has_hadamard(b):
        return hadamard(b)
    u = torch.full((b,), 1.0 / math.sqrt(b), dtype=torch.float64)
    v = u.clone()
    v[0] -= 1.0
    return torch.eye(b, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)


def _batched_random_orthogonal(count: int, b: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(count, b, b, generator=gen, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d[d == 0] = 1.0
    return q * d[:, None, :]


def _greedy_block_rotations(x: torch.Tensor, b: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """DuQuant's greedy rotation of every block of x [T, n] at once -> [n // b, b, b].

    Each step, per block: d = the channel with the largest |x|; candidate R = E_d R~ Q E_d where
    E_d swaps channels 0 and d, R~ has a uniform first row (spreads channel d over the block) and
    Q = diag(1, random orthogonal) mixes the rest; the candidate is composed into the block's
    rotation only if it lowers the block's max |x|.
    """
    t, n = x.shape
    nb = n // b
    cur = x.reshape(t, nb, b)
    rot = torch.eye(b, dtype=torch.float64).repeat(nb, 1, 1)
    best = cur.abs().amax(dim=(0, 2))
    base = _uniform_first_row(b)
    rows = torch.arange(nb)
    for _ in range(steps):
        d = cur.abs().amax(0).argmax(-1)  # [nb]
        sigma = torch.arange(b).repeat(nb, 1)
        sigma[rows, 0] = d
        sigma[rows, d] = 0
        mix = torch.eye(b, dtype=torch.float64).repeat(nb, 1, 1)
        if b > 2:
            mix[:, 1:, 1:] = _batched_random_orthogonal(nb, b - 1, gen)
        m = base @ mix
        m = m.gather(1, sigma[:, :, None].expand(nb, b, b)).gather(2, sigma[:, None, :].expand(nb, b, b))
        cand = torch.einsum("tkb,kbc->tkc", cur, m)
        cmax = cand.abs().amax(dim=(0, 2))
        better = cmax < best
        if not better.any():
            continue
        rot = torch.where(better[:, None, None], rot @ m, rot)
        cur = torch.where(better[None, :, None], cand, cur)
        best = torch.where(better, cmax, best)
    return rot


def zigzag_permutation(absmax: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """DuQuant's zigzag: channels by descending absmax dealt to blocks 0..K-1, K-1..0, 0..K-1, ...

    Returns int64 ``perm`` with ``x[..., perm]`` the permuted tensor: block k holds
    ``perm[k * b:(k + 1) * b]``, so every block gets a balanced share of the large channels.
    """
    n = absmax.shape[-1]
    if num_blocks < 1 or n % num_blocks:
        msg = f"num_blocks={num_blocks} must divide the channel count {n}"
        raise ConfigError(msg)
    b = n // num_blocks
    order = torch.argsort(absmax.to(torch.float64), descending=True, stable=True)
    r = torch.arange(n)
    cycle, pos = r // num_blocks, r % num_blocks
    block = torch.where(cycle % 2 == 0, pos, num_blocks - 1 - pos)
    perm = torch.empty(n, dtype=torch.int64)
    perm[block * b + cycle] = order
    return perm


def duquant_rotation(
    stats: torch.Tensor, block_size: int = 128, steps: int = 256, seed: int = 0
) -> DuQuantRotation:
    """DuQuant (Lin et al. 2024): block rotation R1, zigzag permutation, second block rotation R2.

    ``stats`` is either calibration samples ``[..., n]`` (tracked exactly through the rotations)
    or a per-channel absmax vector ``[n]`` (treated as one representative row, DuQuant's cheap
    mode). R1 is built greedily per block (see `_greedy_block_rotations`); the channels of
    ``x @ blockdiag(R1)`` are then dealt to blocks by `zigzag_permutation` of their absmax so the
    remaining large channels are balanced across blocks, and R2 is built greedily on the
    permuted data. Apply with `duquant_apply`, or fold `duquant_matrix` (orthogonal) offline.
    Cost per step: O(T * n * block_size) for T sample rows; subsample large calibration sets.
    """
    if not isinstance(stats, torch.Tensor) or stats.ndim < 1 or not stats.is_floating_point():
        msg = f"stats must be a floating tensor [n] (absmax) or [..., n] (samples), got {stats!r:.80}"
        raise ConfigError(msg)
    n = stats.shape[-1]
    b = check_order(block_size, "block_size")
    if b < 2 or n % b:
        msg = f"block_size={block_size} must be >= 2 and divide the channel count n={n}"
        raise ConfigError(msg)
    steps = int(steps)
    if steps < 0:
        msg = f"steps must be >= 0, got {steps}"
        raise ConfigError(msg)
    x = stats.to(torch.float64)
    x = x.abs()[None, :] if x.ndim == 1 else x.reshape(-1, n)
    gen = torch.Generator().manual_seed(int(seed))
    with small_op_threads(b):  # a loop of b x b QRs and matmuls (measured 17 s -> 0.2 s, busy CPU)
        r1 = _greedy_block_rotations(x, b, steps, gen)
        x1 = torch.einsum("tkb,kbc->tkc", x.reshape(-1, n // b, b), r1).reshape(-1, n)
        perm = zigzag_permutation(x1.abs().amax(0), n // b)
        r2 = _greedy_block_rotations(x1[:, perm], b, steps, gen)
    return DuQuantRotation(perm, torch.stack([r1, r2]))


def duquant_apply(x: torch.Tensor, perm: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``x @ duquant_matrix(perm, rotations)`` without building the n x n matrix (in x's dtype)."""
    nb, b = rotations.shape[1], rotations.shape[2]
    rot = rotations.to(dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    y = torch.einsum("tkb,kbc->tkc", x.reshape(-1, nb, b), rot[0]).reshape(-1, nb * b)
    y = torch.einsum("tkb,kbc->tkc", y[:, perm.to(x.device)].reshape(-1, nb, b), rot[1])
    return y.reshape(*lead, nb * b)


def duquant_matrix(perm: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The equivalent orthogonal ``M = blockdiag(R1) @ P @ blockdiag(R2)`` (float64), P = I[:, perm]."""
    r = rotations.to(torch.float64)
    n = r.shape[1] * r.shape[2]
    p = torch.eye(n, dtype=torch.float64)[:, perm]
    return torch.block_diag(*r[0]) @ p @ torch.block_diag(*r[1])
