"""The Triton kernel of the online Hadamard op `qpass::hadamard_transform(x, signs) = fwht(x * signs)`
(the op and its pure-torch default live in `qpass.math.hadamard_op`; importing this module
registers the CUDA implementation).

Equal to x @ (diag(signs) H) for the matrix `qpass.math.hadamard.hadamard` builds, in
O(n log n) instead of a dense n x n matmul. CPU runs the pure-torch reference
(`qpass.math.hadamard.fwht`); CUDA runs the Triton kernel below for n = m * 2^k with a
Paley base m <= 32 (m in {1, 12, 20, 28}: the sizes LLMs use, e.g. 11008 = 43*256 is not one,
14336 = 28*512 is). The fake (meta) implementation lets torch.export / torch.compile trace it.

Kernel layout: one program per token row, the row viewed as a [m, 2^k] tile (channel
i = a * 2^k + b, as `fwht` splits it). k butterfly stages run in registers (reshape to
[..., 2, h], split, a+b / a-b, join), then one small [m, m] x [m, 2^k] product applies the
Paley base.
"""

from __future__ import annotations

import math

import torch

from qpass.errors import ConfigError
from qpass.kernels._triton import HAS_TRITON, check_launchable, next_pow2, tl, triton, use_triton
from qpass.math.hadamard import dense_base, require_plan
from qpass.math.hadamard_op import hadamard_reference, hadamard_transform

MAX_BASE = 32  # the Paley base is padded to a power of two in registers; 12, 20, 28 fit


@hadamard_transform.register_kernel("cuda")
def _hadamard_cuda(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """CUDA tensors run the Triton kernel where its register tile fits n, the reference elsewhere."""
    if use_triton(x, signs) and kernel_supports(x.shape[-1]):
        return hadamard_triton(x, signs)
    return hadamard_reference(x, signs)


def kernel_supports(n: int) -> bool:
    """Whether n = m * 2^k with a Paley base m small enough for the register tile."""
    try:
        factors, _ = require_plan(n)
    except ConfigError:
        return False
    return math.prod(factors) <= MAX_BASE


def _base_tile(m: int, mp: int, factors: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """B^T zero-padded to [mp, mp] float32 (identity-free: padded rows/cols are zero)."""
    out = torch.zeros(mp, mp, dtype=torch.float32, device=device)
    if m > 1:
        out[:m, :m] = dense_base(factors).T.to(torch.float32)
    else:
        out[0, 0] = 1.0
    return out


if HAS_TRITON:

    @triton.jit
    def sylvester_rows(y, R: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
        """Unnormalised Sylvester H_P applied to each row of the [R, P] tile y (log2 P stages)."""
        for s in tl.static_range(LOG_P):
            h: tl.constexpr = 1 << s
            y = tl.reshape(y, (R, P // (2 * h), 2, h))
            y = tl.permute(y, (0, 1, 3, 2))
            a, b = tl.split(y)
            y = tl.join(a + b, a - b)
            y = tl.permute(y, (0, 1, 3, 2))
            y = tl.reshape(y, (R, P))
        return y

    @triton.jit
    def _fwht_kernel(
        x_ptr,
        s_ptr,
        bt_ptr,
        out_ptr,
        N,
        scale,
        M: tl.constexpr,
        MP: tl.constexpr,
        P: tl.constexpr,
        LOG_P: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        a = tl.arange(0, MP)[:, None]
        b = tl.arange(0, P)[None, :]
        idx = a * P + b
        mask = a < M
        x = tl.load(x_ptr + row * N + idx, mask=mask, other=0.0).to(tl.float32)
        x = x * tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        y = sylvester_rows(x, MP, P, LOG_P)
        if M > 1:
            ia = tl.arange(0, MP)
            bt = tl.load(bt_ptr + ia[:, None] * MP + ia[None, :])
            if P >= 16:  # tl.dot needs every dim >= 16; ieee keeps the +-1 products exact
                y = tl.dot(bt, y, input_precision="ieee")
            else:
                y = tl.sum(bt[:, :, None] * y[None, :, :], axis=1)
        tl.store(out_ptr + row * N + idx, (y * scale).to(out_ptr.dtype.element_ty), mask=mask)


def hadamard_triton(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Launch the Triton FWHT: one program per row of x[..., n]."""
    check_launchable("hadamard_transform", x, signs)
    n = x.shape[-1]
    if signs.numel() != n:
        msg = f"hadamard_transform: signs has {signs.numel()} entries, x's last axis {n}"
        raise ConfigError(msg)
    factors, k = require_plan(n)
    m = math.prod(factors)
    if m > MAX_BASE:
        msg = f"hadamard_transform kernel: n={n} = {m} * 2^{k} needs a base <= {MAX_BASE}; use the reference"
        raise ConfigError(msg)
    mp = next_pow2(m)
    rows = x.reshape(-1, n).contiguous()
    out = torch.empty_like(rows)
    bt = _base_tile(m, mp, factors, x.device)
    if rows.shape[0]:
        _fwht_kernel[(rows.shape[0],)](
            rows, signs.contiguous(), bt, out, n, 1.0 / math.sqrt(n), M=m, MP=mp, P=1 << k, LOG_P=k
        )
    return out.reshape(x.shape)
