"""Hadamard matrices of many sizes and the fast Walsh-Hadamard transform that applies them.

Pure torch, no graphs: `qpass.passes.rotate` decides where a rotation goes. Matrices are built in
float64 (the ±1 patterns exactly) and returned in the dtype asked for (float64 by default).

Conventions
-----------
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

import functools
import math

import torch

from qpass.errors import ConfigError
from qpass.math.checks import check_float_dtype, check_order

__all__ = [
    "dense_base",
    "fwht",
    "hadamard",
    "hadamard_block_size",
    "hadamard_construction",
    "has_hadamard",
    "random_signs",
    "randomized_hadamard",
    "require_plan",
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


def has_hadamard(n: int) -> bool:
    """Whether `hadamard(n)` can build a Hadamard matrix of order n."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and _plan(n) is not None


def _nearest_sizes(n: int) -> str:
    below = next((c for c in range(n - 1, 0, -1) if _plan(c) is not None), None)
    above = next(c for c in range(n + 1, 4 * n + 8) if _plan(c) is not None)
    return ", ".join(str(c) for c in (below, above) if c is not None)


def require_plan(n: object) -> tuple[tuple[int, ...], int]:
    n = check_order(n)
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
    n = check_order(n)
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


# --------------------------------------------------------------------------- Hadamard matrices


def hadamard(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``[n, n]``: entries ±1/sqrt(n), ``H H^T = I``.

    ``H = (B ⊗ S_{2^k}) / sqrt(n)`` as the module docstring describes; ``fwht(x) == x @ H``.
    Raises ConfigError (naming n, the nearest constructible sizes and the largest constructible
    block) when no construction is known.
    """
    check_float_dtype(dtype)
    factors, k = require_plan(n)
    base = dense_base(factors).to(dtype=dtype, device=device)
    h = torch.kron(base, _sylvester(k, dtype, device)) if k else base.clone()
    return h.mul_(1.0 / math.sqrt(n))


def random_signs(n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded ±1 vector of length n (the diagonal of randomized_hadamard)."""
    n = check_order(n)
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
