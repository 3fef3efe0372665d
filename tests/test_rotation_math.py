"""Rotation math: Hadamard matrices of every constructible size, the FWHT that applies them,
random / KLT / DuQuant rotations, and the outlier and quantized-matmul error they remove.
"""

from __future__ import annotations

import math

import pytest
import torch

from qpass.errors import ConfigError
from qpass.formats import get_format
from qpass.math.duquant import duquant_apply, duquant_matrix, duquant_rotation, zigzag_permutation
from qpass.math.hadamard import (
    fwht,
    hadamard,
    hadamard_block_size,
    hadamard_construction,
    has_hadamard,
    random_signs,
    randomized_hadamard,
)
from qpass.math.rotation import (
    channel_covariance,
    klt_rotation,
    outlier_ratio,
    random_orthogonal,
    rotate_error,
)

F64 = torch.float64

# Sylvester, Paley I (prime and prime-power q), Paley II (prime and prime-power q), products,
# and the model widths (MiniLM 384, SmolLM2 576 / 1536).
SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 52, 60, 64, 76, 100, 108, 148, 344, 384, 576, 1536]
SIZES += [12 * 2**k for k in (1, 3, 5)] + [20 * 2**k for k in (2, 4, 6)] + [28 * 8, 36 * 4, 40 * 16]


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


@pytest.mark.parametrize("n", sorted(set(SIZES)))
def test_hadamard_orthonormal(n):
    h = hadamard(n)
    assert h.dtype == F64 and h.shape == (n, n)
    assert torch.allclose(h @ h.T, _eye(n), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-15, rtol=0)
    assert has_hadamard(n)


def test_hadamard_dtype_and_named_constructions():
    h32 = hadamard(576, dtype=torch.float32)
    assert h32.dtype == torch.float32
    assert torch.equal(h32, hadamard(576).float())
    assert hadamard_construction(576) == "Paley II (q=17) 36 ⊗ Sylvester 16"
    assert hadamard_construction(1536) == "Paley I (q=11) 12 ⊗ Sylvester 128"
    assert hadamard_construction(384) == "Paley I (q=11) 12 ⊗ Sylvester 32"
    assert hadamard_construction(4096) == "Sylvester 4096"
    assert hadamard_construction(11008) == "Paley I (q=343) 344 ⊗ Sylvester 32"  # GF(7^3)
    assert hadamard_construction(14336) == "Paley I (q=27) 28 ⊗ Sylvester 512"
    assert hadamard_construction(1904) == "Paley I (q=27) 28 ⊗ Paley I (q=67) 68"  # product of two Paleys
    h = hadamard(1904)
    assert torch.allclose(h @ h.T, _eye(1904), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [2048, 4096, 11008, 14336])
def test_large_sizes_via_fwht(n):
    """Without building n x n: fwht preserves Gram matrices (orthogonal) and maps basis vectors
    to rows of ±1/sqrt(n) (a Hadamard pattern).
    """
    assert has_hadamard(n)
    gen = torch.Generator().manual_seed(n)
    v = torch.randn(8, n, generator=gen, dtype=F64)
    y = fwht(v)
    assert torch.allclose(y @ y.T, v @ v.T, atol=1e-9 * n, rtol=1e-12)
    basis = torch.zeros(6, n, dtype=F64)
    basis[torch.arange(6), torch.randint(0, n, (6,), generator=gen)] = 1.0
    rows = fwht(basis)
    assert torch.allclose(rows.abs(), torch.full_like(rows, 1 / math.sqrt(n)), atol=1e-14, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 12, 24, 36, 160, 384, 576, 1536, 1904])
def test_fwht_equals_matrix(n):
    gen = torch.Generator().manual_seed(n)
    h = hadamard(n)
    x = torch.randn(3, 5, n, generator=gen, dtype=F64)
    assert torch.allclose(fwht(x), x @ h, atol=1e-10, rtol=0)
    xt = x.transpose(1, 2).contiguous()  # channels on a middle axis
    assert torch.allclose(fwht(xt, dim=1), (x @ h).transpose(1, 2), atol=1e-10, rtol=0)
    x32 = x.float()
    assert torch.allclose(fwht(x32), (x32 @ h.float()), atol=1e-4, rtol=1e-4)
    assert fwht(x32).dtype == torch.float32


def test_unconstructible_sizes_raise_with_the_size_named():
    for n in (92, 172):  # multiples of 4 beyond Sylvester/Paley/Kronecker (e.g. 11008 = 64 * 172)
        assert not has_hadamard(n)
        with pytest.raises(ConfigError, match=rf"n={n}\b.*nearest constructible sizes"):
            hadamard(n)
    with pytest.raises(ConfigError, match=r"n=92\b.*88, 96.*block dividing 92: 4"):
        fwht(torch.zeros(2, 92))
    with pytest.raises(ConfigError, match=r"n=22\b.*multiples of 4"):
        hadamard(22)
    assert hadamard_block_size(22) == 2 and hadamard_block_size(11008) == 11008
    with pytest.raises(ConfigError, match="positive int"):
        hadamard(0)
    with pytest.raises(ConfigError, match="floating"):
        fwht(torch.zeros(2, 8, dtype=torch.int64))


def test_random_orthogonal_seeded():
    q = random_orthogonal(96, seed=3)
    assert torch.allclose(q @ q.T, _eye(96), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(96, seed=3))
    assert not torch.allclose(q, random_orthogonal(96, seed=4))
    assert random_orthogonal(8, 0, dtype=torch.float32).dtype == torch.float32


def test_randomized_hadamard_is_input_sign_flip_then_fwht():
    n = 384
    q = randomized_hadamard(n, seed=1)
    s = random_signs(n, seed=1)
    assert torch.allclose(q @ q.T, _eye(n), atol=1e-12, rtol=0)
    assert torch.equal(q, s[:, None] * hadamard(n))
    x = torch.randn(4, n, dtype=F64)
    assert torch.allclose(x @ q, fwht(x * s), atol=1e-10, rtol=0)
    # a constant row is a single spike after a plain Hadamard, spread after the randomized one
    ones = torch.ones(1, n, dtype=F64)
    assert outlier_ratio(ones @ hadamard(n)) > 100 * outlier_ratio(ones @ q)


def _outlier_data(seed: int, n: int = 384, tokens: int = 256):
    """Gaussian activations with channel scales in [0.5, 1.5] and five outlier channels (30-100x)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen, dtype=F64) * (0.5 + torch.rand(n, generator=gen, dtype=F64))
    channels = torch.randperm(n, generator=gen)[:5]
    x[:, channels] *= torch.tensor([100.0, 60.0, 80.0, 30.0, 50.0], dtype=F64)
    w = torch.randn(96, n, generator=gen, dtype=F64) / math.sqrt(n)
    return x, w


def test_klt_diagonalises_covariance():
    x, _ = _outlier_data(0, n=64)
    cov = channel_covariance(x)
    q = klt_rotation(cov)
    assert torch.allclose(q @ q.T, _eye(64), atol=1e-10, rtol=0)
    d = q.T @ cov @ q
    off = d - torch.diag(torch.diagonal(d))
    assert off.abs().max() < 1e-9 * cov.abs().max()
    ev = torch.diagonal(d)
    assert torch.all(ev[:-1] >= ev[1:] - 1e-9)  # sorted, largest first
    assert torch.equal(q, klt_rotation(cov.clone()))  # deterministic, signs fixed
    assert torch.all(q[q.abs().argmax(0), torch.arange(64)] > 0)
    # KLT + Hadamard (MambaQuant): every output channel gets variance trace / n
    qh = klt_rotation(cov, with_hadamard=True)
    var = torch.diagonal(qh.T @ cov @ qh)
    assert torch.allclose(var, torch.full_like(var, float(torch.trace(cov)) / 64), rtol=1e-9)
    with pytest.raises(ConfigError, match="square"):
        klt_rotation(torch.zeros(3, 4))


def test_zigzag_balances_blocks():
    absmax = torch.arange(16, 0, -1, dtype=F64)  # channel 0 largest
    perm = zigzag_permutation(absmax, 4)
    assert sorted(perm.tolist()) == list(range(16))
    blocks = perm.reshape(4, 4)
    assert blocks[:, 0].tolist() == [0, 1, 2, 3] and blocks[:, 1].tolist() == [7, 6, 5, 4]
    sums = absmax[perm].reshape(4, 4).sum(1)
    assert sums.max() - sums.min() == 0  # zigzag of a linear ramp balances exactly


def test_duquant_orthogonal_and_flattens_outliers():
    x, _ = _outlier_data(0)
    rot = duquant_rotation(x, block_size=64, steps=32, seed=0)
    perm, rotations = rot
    assert rotations.shape == (2, 6, 64, 64)
    assert sorted(perm.tolist()) == list(range(384))
    m = duquant_matrix(perm, rotations)
    assert torch.allclose(m @ m.T, _eye(384), atol=1e-12, rtol=0)
    assert torch.allclose(duquant_apply(x, perm, rotations), x @ m, atol=1e-9, rtol=0)
    before, after = outlier_ratio(x), outlier_ratio(x @ m)
    assert before > 50 and after < before / 20
    # the cheap mode from a calibrated absmax vector alone
    m_abs = duquant_matrix(*duquant_rotation(x.abs().amax(0), block_size=64, steps=32))
    assert outlier_ratio(x @ m_abs) < before / 10
    with pytest.raises(ConfigError, match="block_size=100"):
        duquant_rotation(x, block_size=100)


def test_outlier_ratio():
    x = torch.ones(10, 5)
    x[:, 2] = 7.0
    assert outlier_ratio(x) == pytest.approx(7.0)
    assert outlier_ratio(x.T.contiguous(), dim=0) == pytest.approx(7.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_rotations_lower_quantized_matmul_error(seed):
    """Per-tensor INT8/INT4 activations and weights on data with outlier channels."""
    x, w = _outlier_data(seed)
    n = x.shape[1]
    int8 = get_format("int8", granularity="per_tensor")
    int4 = get_format("int4", granularity="per_tensor")
    h = hadamard(n)
    dq = duquant_matrix(*duquant_rotation(x, block_size=64, steps=32, seed=0))
    kh = klt_rotation(channel_covariance(x), with_hadamard=True)
    none8, had8, dq8, kh8 = (rotate_error(x, w, q, int8) for q in (None, h, dq, kh))
    assert had8 < none8 / 4  # measured ~6x
    assert kh8 < none8 / 4
    assert dq8 < none8 / 3  # measured ~5x; block-diagonal, so a little above the full Hadamard
    assert dq8 < 1.5 * had8
    assert rotate_error(x, w, h, int4) < rotate_error(x, w, None, int4)  # measured 0.25-0.28 vs 0.31
    assert rotate_error(x, w, torch.eye(n, dtype=F64), int8) == pytest.approx(none8)
