"""W8A8 INT8 GEMM with a fused dequantizing epilogue, and fused dynamic per-token activation
quantization (optionally after a power-of-two online Hadamard), each beside its torch twin.

    q, s_a = quantize_per_token(x)                   # s_a = max(|x_row|) / 127, q = round(x / s_a)
    y = int8_gemm(q, s_a, w_codes, s_w, bias, dtype) # (q @ w^T) in int32, * s_a[:, None] * s_w[None, :] + bias

`w_codes` is int8 [N, K] (symmetric per-output-channel weights, zero point 0) as
`qpass.quant.qlinear.QLinear` holds them. The references are the CPU path: `int8_matmul` is an exact
int8 x int8 -> int32 GEMM (`torch._int_mm`, or chunked float32 GEMMs where those are faster);
it wants its weight operand as a contiguous [K, N] matrix (a transposed view is ~2.5x slower on
CPU), so callers pass `w_kn`.
Rounding is half-to-even everywhere, as `torch.round` and `qpass.formats` do.
"""

from __future__ import annotations

import os
import time

import torch

from qpass.errors import ConfigError
from qpass.kernels._triton import (
    HAS_TRITON,
    cdiv,
    check_launchable,
    interpreting,
    next_pow2,
    tl,
    triton,
    use_triton,
)

QMAX = 127  # narrow-range symmetric INT8, as qpass.formats quantizes (codes in [-127, 127])


# --------------------------------------------------------------------------- torch references
def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 per row of x[..., K]: (codes int8 [..., K], scales float32 [...])."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    scale = amax / QMAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xf / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


EXACT_FLOAT_K = 1024  # 1024 * 128 * 128 = 2^24: float32 sums of int8 products stay exact integers


def _float_int8_matmul(q: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 through float32 GEMMs over K-chunks of <= 1024: every product and every
    partial sum is an integer below 2^24, so each chunk is exact whatever the GEMM's summation
    order, and the chunks add exactly in int32 (bit-identical to `torch._int_mm`).
    """
    k = q.shape[1]
    out = None
    for lo in range(0, k, EXACT_FLOAT_K):
        part = (q[:, lo : lo + EXACT_FLOAT_K].to(torch.float32) @ w_kn[lo : lo + EXACT_FLOAT_K].to(torch.float32))
        part = part.to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else q.new_zeros((q.shape[0], w_kn.shape[1]), dtype=torch.int32)


_CPU_INT8_PATH: dict[str, str] = {}


def _cpu_int8_path() -> str:
    """Which exact CPU path is faster here: `torch._int_mm` (fast with VNNI/AMX int8 dot products;
    on AVX2-only CPUs measured ~30x slower than float32) or chunked float32 GEMMs. Measured once
    per process on a small problem; `QPASS_CPU_INT8=int_mm|float` overrides. Both are exact, so
    the choice changes speed only, never results.
    """
    if "path" not in _CPU_INT8_PATH:
        choice = os.environ.get("QPASS_CPU_INT8", "")
        if choice not in ("int_mm", "float"):
            q = torch.randint(-127, 128, (64, 512), dtype=torch.int8)
            w = torch.randint(-127, 128, (512, 512), dtype=torch.int8)
            times = {}
            for name, fn in (("int_mm", torch._int_mm), ("float", _float_int8_matmul)):
                fn(q, w)  # warm-up
                start = time.perf_counter()
                fn(q, w)
                times[name] = time.perf_counter() - start
            choice = min(times, key=times.__getitem__)
        _CPU_INT8_PATH["path"] = choice
    return _CPU_INT8_PATH["path"]


def int8_matmul(q: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32 [M, N]: `torch._int_mm` off the CPU; on the CPU the
    faster of `torch._int_mm` and chunked float32 GEMMs (`_cpu_int8_path`).
    """
    if q.device.type == "cpu" and _cpu_int8_path() == "float":
        return _float_int8_matmul(q, w_kn)
    return torch._int_mm(q, w_kn)


def int8_gemm_reference(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w_kn: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(q [M, K] @ w_kn [K, N]) in int32 (`int8_matmul`), then the per-token x per-channel epilogue."""
    y = int8_matmul(q, w_kn).to(torch.float32)
    y.mul_(a_scale.reshape(-1, 1)).mul_(w_scale.reshape(1, -1))  # in place: the epilogue is memory bound
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype)


# --------------------------------------------------------------------------- PT2 ops
@torch.library.custom_op("qpass::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT8 of x[M, K]: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return quantize_per_token_triton(x)
    return quantize_per_token_reference(x)


@quantize_per_token.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("qpass::quantize_per_token_hadamard", mutates_args=())
def quantize_per_token_hadamard(x: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token(x @ diag(signs) H_K), K a power of two: one fused Triton pass on CUDA
    (the rotated row never leaves registers), the two references in sequence elsewhere.
    """
    if use_triton(x, signs):
        return quantize_per_token_triton(x, signs)
    from qpass.kernels.hadamard import hadamard_reference

    return quantize_per_token_reference(hadamard_reference(x, signs))


@quantize_per_token_hadamard.register_fake
def _(x: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("qpass::int8_gemm", mutates_args=())
def int8_gemm(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w_kn: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y[M, N] = (q @ w_kn) * a_scale[:, None] * w_scale[None, :] + bias, in out_dtype."""
    if use_triton(q, w_kn):
        return int8_gemm_triton(q, a_scale, w_kn, w_scale, bias, out_dtype)
    return int8_gemm_reference(q, a_scale, w_kn, w_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(q, a_scale, w_kn, w_scale, bias, out_dtype):
    return q.new_empty((q.shape[0], w_kn.shape[1]), dtype=out_dtype)


# --------------------------------------------------------------------------- Triton kernels
# Autotune candidates for the INT8 GEMM on CUDA (H100-class): the usual int8 tensor-core tiles,
# a 128x128 and a 128x256 tile for large M (compute bound), a 64x128 and a 16/32-row tile for
# decode-size M (weight-bandwidth bound). Kept small so first-call tuning stays short.
INT8_GEMM_CONFIGS = (
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
)

if HAS_TRITON:
    from qpass.kernels.hadamard import sylvester_rows

    @triton.jit
    def round_half_even(v):
        """torch.round's rule (ties to even) from floor, so kernels match the references bit for bit."""
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quant_rows_kernel(
        x_ptr,
        s_ptr,
        q_ptr,
        scale_ptr,
        K,
        hscale,
        HADAMARD: tl.constexpr,
        BLOCK: tl.constexpr,
        LOG_B: tl.constexpr,
    ):
        """One row: (optional sign flip + Sylvester FWHT) -> absmax -> scale -> round -> int8."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        if HADAMARD:
            x = x * tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.reshape(sylvester_rows(tl.reshape(x, (1, BLOCK)), 1, BLOCK, LOG_B), (BLOCK,)) * hscale
        amax = tl.max(tl.abs(x), axis=0)
        scale = amax / 127.0
        scale = tl.where(scale == 0.0, 1.0, scale)
        q = round_half_even(tl.math.div_rn(x, scale + tl.zeros_like(x)))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _int8_gemm_kernel(
        a_ptr,
        b_ptr,
        sa_ptr,
        sb_ptr,
        bias_ptr,
        c_ptr,
        M,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """C = (A[M,K] int8 @ B[K,N] int8) as int32, scaled per row of A and per column of B."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n  # grouped ordering: neighbouring programs share B tiles in L2
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                a_ptr + rm[:, None].to(tl.int64) * K + kk[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0,
            )
            b = tl.load(
                b_ptr + kk[:, None].to(tl.int64) * N + rn[None, :],
                mask=(kk[:, None] < K) & (rn[None, :] < N),
                other=0,
            )
            acc += tl.dot(a, b, out_dtype=tl.int32)
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)

    _int8_gemm_tuned = triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k.isupper()},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in INT8_GEMM_CONFIGS
        ],
        key=["M", "N", "K"],
    )(_int8_gemm_kernel)


def quantize_per_token_triton(
    x: torch.Tensor, signs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused row quantizer; with `signs`, x is first rotated by diag(signs) H_K (K a power of two)."""
    check_launchable("quantize_per_token", x)
    k = x.shape[-1]
    if signs is not None and (k & (k - 1) or signs.numel() != k):
        msg = (
            f"quantize_per_token: the fused Hadamard needs a power-of-two last axis with {k} signs, got K={k}"
        )
        raise ConfigError(msg)
    rows = x.reshape(-1, k).contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    block = next_pow2(k)
    if rows.shape[0]:
        _quant_rows_kernel[(rows.shape[0],)](
            rows,
            rows if signs is None else signs.contiguous(),
            q,
            scale,
            k,
            k**-0.5,
            HADAMARD=signs is not None,
            BLOCK=block,
            LOG_B=block.bit_length() - 1,
        )
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def int8_gemm_triton(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w_kn: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the INT8 GEMM; `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K) skips autotuning (interpreter, tests)."""
    check_launchable("int8_gemm", q, w_kn)
    m, k = q.shape
    k2, n = w_kn.shape
    if k != k2 or q.dtype != torch.int8 or w_kn.dtype != torch.int8:
        msg = (
            f"int8_gemm: expected int8 [M, K] @ int8 [K, N], "
            f"got {q.dtype} {tuple(q.shape)} @ {w_kn.dtype} {tuple(w_kn.shape)}"
        )
        raise ConfigError(msg)
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    args = (
        q.contiguous(),
        w_kn.contiguous(),
        a_scale.reshape(-1).float().contiguous(),
        w_scale.reshape(-1).float().contiguous(),
    )
    bias_arg = bias.contiguous() if bias is not None else out
    if blocks is None and interpreting():
        blocks = (32, 32, 32)
    if blocks is not None:
        bm, bn, bk = blocks
        grid = (cdiv(m, bm) * cdiv(n, bn),)
        _int8_gemm_kernel[grid](
            *args,
            bias_arg,
            out,
            m,
            n,
            k,
            HAS_BIAS=bias is not None,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=4,
        )
        return out

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    _int8_gemm_tuned[grid](*args, bias_arg, out, m, n, k, HAS_BIAS=bias is not None)
    return out
