"""Backend-neutral rotation math: Hadamard matrices of many sizes, the fast Walsh-Hadamard
transform, random / KLT / DuQuant rotations, and the measurements that show why they help.

Everything here is pure torch and knows nothing about graphs: `passes/rotate.py` decides where a
rotation goes, this module decides which orthogonal matrix. Matrices are built in float64 (the
±1 patterns exactly) and returned in the dtype asked for (float64 by default).

Conventions
-----------
* A rotation ``Q`` acts on the *last* (channel) axis from the right: ``x -> x @ Q``, and a linear
  ``y = x W^T`` stays exact as ``y = (x Q)(W Q)^T`` because ``Q Q^T = I``.
* ``hadamard(n)`` is the Kronecker product ``B ⊗ S`` of a dense *base* ``B`` of order ``m`` and
  the Sylvester matrix ``S`` of order ``2^k`` (``n = m * 2^k``, ``k`` as large as a construction
  allows, so the dense part is small), scaled by ``1/sqrt(n)``. ``S`` is in natural (Sylvester)
  order: ``S_1 = [1]``, ``S_2k = [[S_k, S_k], [S_k, -S_k]]``, i.e. ``S[i, j] = (-1)^popcount(i & j)``.
  ``B`` is ``1`` for powers of two, one Paley matrix, or the Kronecker product of several Paley
  matrices in ascending order. Channel ``i`` of ``x`` is the pair ``(i // 2^k, i % 2^k)``.
* ``fwht(x) == x @ hadamard(n)`` for that same matrix: the Sylvester factor is applied to the
  trailing ``2^k`` block of every channel index by ``k`` butterfly stages (O(n log n)), and the
  base by one small ``m x m`` matmul on the leading index (``B^T @ x.view(..., m, 2^k)``).

Hadamard constructions (entries ±1, ``H H^T = n I`` before scaling):
* Sylvester: every ``2^k``.
* Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)`` (12, 20, 24, 28, 32, 44, 48, 60,
  68, 72, 80, 84, 104, ..., 344 = 7^3 + 1, ...).
* Paley II: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)`` (12, 20, 28, 36, 52, 60, 76,
  84, 100, 108, ...).
* Kronecker products of the above with each other and with Sylvester matrices.
That covers 12·2^k, 20·2^k, 28·2^k, 36·2^k, 40·2^k, ... and the model sizes 384 = 12·32,
576 = 36·16, 1536 = 12·128, 11008 = 344·32, 14336 = 28·512; not, e.g., 92, 172 or 188 (Hadamard
matrices of those orders exist but need Williamson-type or tabulated constructions), nor any
order other than 1, 2 and multiples of 4 (no Hadamard matrix exists). ``hadamard_block_size(n)``
gives the largest constructible block for a block-diagonal fallback.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch

from qpass.errors import ConfigError
from qpass.formats import QuantSpec, fake_quantize
from qpass.threads import single_thread

__all__ = [
    "DuQuantRotation",
    "channel_covariance",
    "duquant_apply",
    "duquant_matrix",
    "duquant_rotation",
    "fwht",
    "hadamard",
    "hadamard_block_size",
    "hadamard_construction",
    "has_hadamard",
    "klt_rotation",
    "outlier_ratio",
    "random_orthogonal",
    "random_signs",
    "randomized_hadamard",
    "rotate_error",
    "zigzag_permutation",
]


# --------------------------------------------------------------------------- number theory


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _smallest_prime_factor(n: int) -> int:
    if n % 2 == 0:
        return 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return f
        f += 2
    return n


@functools.cache
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, or None."""
    if q < 2:
        return None
    p = _smallest_prime_factor(q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


@functools.cache
def _paley(m: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) when a Paley construction gives order m (Paley I preferred)."""
    if m < 4 or m % 4:
        return None
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        return ("I", m - 1)
    q = m // 2 - 1
    if q % 4 == 1 and _prime_power(q):
        return ("II", q)
    return None


@functools.cache
def _base_factors(m: int) -> tuple[int, ...] | None:
    """Non-power-of-two Paley orders whose product is m (fewest/smallest first), or None."""
    if m == 1:
        return ()
    if _is_power_of_two(m):  # handled by the Sylvester part (a larger k)
        return None
    if _paley(m):
        return (m,)
    best: tuple[int, ...] | None = None
    for d in range(12, math.isqrt(m) + 1):
        if m % d or _is_power_of_two(d) or not _paley(d):
            continue
        rest = _base_factors(m // d)
        if rest is None:
            continue
        cand = tuple(sorted((d, *rest)))
        if best is None or (max(cand), len(cand)) < (max(best), len(best)):
            best = cand
    return best


@functools.cache
def _plan(n: int) -> tuple[tuple[int, ...], int] | None:
    """(base factors, k) with n = prod(factors) * 2^k and k maximal, or None if not constructible."""
    if n < 1:
        return None
    k_max = (n & -n).bit_length() - 1
    for k in range(k_max, -1, -1):
        factors = _base_factors(n >> k)
        if factors is not None:
            return factors, k
    return None


def _check_order(n: object, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        msg = f"{what} must be a positive int, got {n!r}"
        raise ConfigError(msg)
    return n


def has_hadamard(n: int) -> bool:
    """Whether `hadamard(n)` can build a Hadamard matrix of order n."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and _plan(n) is not None


def _nearest_sizes(n: int) -> str:
    below = next((c for c in range(n - 1, 0, -1) if _plan(c) is not None), None)
    above = next(c for c in range(n + 1, 4 * n + 8) if _plan(c) is not None)
    return ", ".join(str(c) for c in (below, above) if c is not None)


def require_plan(n: object) -> tuple[tuple[int, ...], int]:
    n = _check_order(n)
    plan = _plan(n)
    if plan is not None:
        return plan
    if n > 2 and n % 4:
        why = "no Hadamard matrix of that order exists (orders are 1, 2 or multiples of 4)"
    else:
        why = (
            "qpass has no construction for it (Sylvester 2^k; Paley I, order q+1 for a prime power "
            "q ≡ 3 mod 4; Paley II, order 2(q+1) for q ≡ 1 mod 4; Kronecker products of these)"
        )
    msg = (
        f"no Hadamard matrix of order n={n}: {why}; nearest constructible sizes: {_nearest_sizes(n)}; "
        f"largest constructible block dividing {n}: {hadamard_block_size(n)} (block-diagonal "
        "Hadamard), or use random_orthogonal(n, seed)"
    )
    raise ConfigError(msg)


def hadamard_block_size(n: int) -> int:
    """Largest divisor b of n with a constructible Hadamard matrix (for blockdiag(H_b, ..., H_b))."""
    n = _check_order(n)
    return max(d for d in range(1, n + 1) if n % d == 0 and _plan(d) is not None)


def hadamard_construction(n: int) -> str:
    """How `hadamard(n)` is built, for reports: e.g. ``'Paley II (q=17) 36 ⊗ Sylvester 16'``."""
    factors, k = require_plan(n)
    parts = []
    for m in factors:
        kind, q = _paley(m)
        parts.append(f"Paley {kind} (q={q}) {m}")
    if k or not parts:
        parts.append(f"Sylvester {1 << k}")
    return " ⊗ ".join(parts)


# --------------------------------------------------------------------------- finite fields


def _poly_rem(a: list[int], g: list[int], p: int) -> list[int]:
    """Remainder of a by the monic g over GF(p); coefficient lists low -> high."""
    a = list(a)
    dg = len(g) - 1
    for i in range(len(a) - 1, dg - 1, -1):
        c = a[i] % p
        if c:
            for j in range(dg + 1):
                a[i - dg + j] = (a[i - dg + j] - c * g[j]) % p
    return [c % p for c in a[:dg]]


def _digits(v: int, p: int, e: int) -> list[int]:
    return [(v // p**i) % p for i in range(e)]


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p) (brute force; e is small)."""
    for tail in range(1, p**e):
        f = [*_digits(tail, p, e), 1]
        if f[0] == 0:
            continue
        if all(
            any(_poly_rem(f, [*_digits(t, p, d), 1], p)) for d in range(1, e // 2 + 1) for t in range(p**d)
        ):
            return f
    msg = f"no irreducible polynomial of degree {e} over GF({p})"  # unreachable: one always exists
    raise ConfigError(msg)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q), chi the quadratic character; elements in base-p digit order."""
    p, e = _prime_power(q)
    idx = torch.arange(q, dtype=torch.int64)
    if e == 1:
        diff = (idx[:, None] - idx[None, :]) % q
        squares = (idx[1:] * idx[1:]) % q
    else:
        pw = p ** torch.arange(e, dtype=torch.int64)
        dig = (idx[:, None] // pw) % p  # [q, e]
        diff = (((dig[:, None, :] - dig[None, :, :]) % p) * pw).sum(-1)
        f = torch.tensor(_irreducible(p, e), dtype=torch.int64)
        sq = torch.zeros(q, 2 * e - 1, dtype=torch.int64)
        for i in range(e):
            for j in range(e):
                sq[:, i + j] += dig[:, i] * dig[:, j]
        sq %= p
        for d in range(2 * e - 2, e - 1, -1):  # reduce modulo the monic f
            sq[:, d - e : d + 1] = (sq[:, d - e : d + 1] - sq[:, d : d + 1] * f) % p
        squares = (sq[1:, :e] * pw).sum(-1)
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[squares] = 1.0
    chi[0] = 0.0
    return chi[diff]


@functools.lru_cache(maxsize=32)
def _paley_matrix(m: int) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix of Paley order m (float64, cached; do not mutate)."""
    kind, q = _paley(m)
    jac = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 1:] = jac
    if kind == "I":  # q ≡ 3 mod 4: jac is skew, I + [[0, 1], [-1, jac]] is Hadamard
        c[1:, 0] = -1.0
        return torch.eye(q + 1, dtype=torch.float64) + c
    # q ≡ 1 mod 4: symmetric conference matrix C; 0 -> [[1, -1], [-1, -1]], ±1 -> ±[[1, 1], [1, -1]]
    c[1:, 0] = 1.0
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), z2)


@functools.lru_cache(maxsize=32)
def dense_base(factors: tuple[int, ...]) -> torch.Tensor:
    """Unnormalized ±1 base B = kron of the Paley factors in the given order (float64, cached)."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        out = torch.kron(out, _paley_matrix(m))
    return out


def _sylvester(k: int, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        msg = f"dtype must be a floating dtype, got {dtype}"
        raise ConfigError(msg)


def _small_op_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """One intra-op thread for small LAPACK calls (n <= 512) and loops of small ops."""
    return single_thread(n <= 512)


# --------------------------------------------------------------------------- Hadamard matrices


def hadamard(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``[n, n]``: entries ±1/sqrt(n), ``H H^T = I``.

    ``H = (B ⊗ S_{2^k}) / sqrt(n)`` as the module docstring describes; ``fwht(x) == x @ H``.
    Raises ConfigError (naming n, the nearest constructible sizes and the largest constructible
    block) when no construction is known.
    """
    _check_float_dtype(dtype)
    factors, k = require_plan(n)
    base = dense_base(factors).to(dtype=dtype, device=device)
    h = torch.kron(base, _sylvester(k, dtype, device)) if k else base.clone()
    return h.mul_(1.0 / math.sqrt(n))


def random_signs(n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded ±1 vector of length n (the diagonal of randomized_hadamard)."""
    n = _check_order(n)
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def randomized_hadamard(
    n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``diag(s) @ H`` with seeded signs s = random_signs(n, seed).

    The signs act on the *input* channels, so ``x @ Q == fwht(x * s)``. (``H @ diag(s)`` would
    only flip output signs and leave every |entry| of ``x @ H`` unchanged; flipping the inputs
    first is what keeps structured inputs, e.g. a constant row, from concentrating on one channel.)
    """
    s = random_signs(n, seed, dtype=dtype).to(device)
    return s[:, None] * hadamard(n, dtype=dtype, device=device)


def random_orthogonal(
    n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]``: QR of a seeded float64 Gaussian, columns sign-fixed so
    that ``diag(R) > 0`` (makes Q unique, hence deterministic for a seed).
    """
    n = _check_order(n)
    _check_float_dtype(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    with _small_op_threads(n):
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Fast Walsh-Hadamard transform along ``dim``: ``fwht(x) == x @ hadamard(n)`` (n = x.shape[dim]).

    Batched over all other axes, computed in x's dtype on x's device. For n = m * 2^k the channel
    index is split as (i // 2^k, i % 2^k): k butterfly stages (a+b, a-b) apply the Sylvester
    factor to the trailing 2^k part in O(n log n), then one ``B^T @ x.view(..., m, 2^k)`` applies
    the m x m base. Raises ConfigError for sizes `hadamard` cannot build.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        msg = f"fwht needs a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
        raise ConfigError(msg)
    n = x.shape[dim]
    factors, k = require_plan(n)
    p, m = 1 << k, n >> k
    y = x.movedim(dim, -1)
    lead = y.shape[:-1]
    y = y.reshape(-1, m, p)
    h = 1
    while h < p:  # stage h: butterflies between index bits of weight h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.matmul(dense_base(factors).to(dtype=y.dtype, device=y.device).T, y)
    y = y * (1.0 / math.sqrt(n))
    return y.reshape(*lead, n).movedim(-1, dim)


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
    with _small_op_threads(c.shape[0]):
        evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    q = evecs[:, torch.argsort(evals, descending=True, stable=True)]
    cols = torch.arange(q.shape[1])
    q = q * torch.sign(q[q.abs().argmax(0), cols])
    if with_hadamard:
        q = q @ hadamard(q.shape[0])
    return q


# --------------------------------------------------------------------------- DuQuant


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
    b = _check_order(block_size, "block_size")
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
    with _small_op_threads(b):  # a loop of b x b QRs and matmuls (measured 17 s -> 0.2 s, busy CPU)
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
