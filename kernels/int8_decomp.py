"""LLM.int8()-style decomposition GEMM: INT8 over the normal input channels plus a float GEMM over
the few outlier channels, summed in one kernel launch; torch twin beside it.

    y = dequant(q_normal @ W8_normal) + x_outlier @ W_outlier + bias

`q_normal` is the per-token INT8 quantization of x without its outlier columns (so outliers do
not inflate the per-token scales); the outlier columns stay in the activation dtype. The
kernel runs the int32 K-loop over the normal channels, then a float K-loop over the outlier
channels into a second accumulator, and applies the epilogue once.
"""

from __future__ import annotations

import torch

from qpass.errors import ConfigError
from qpass.kernels._triton import HAS_TRITON, cdiv, check_launchable, interpreting, tl, triton, use_triton
from qpass.kernels.w8a8 import int8_gemm_reference, quantize_per_token_reference


def split_columns(x: torch.Tensor, outliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x without the outlier columns, x's outlier columns) for x[M, K] and outlier indices."""
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    keep[outliers] = False
    return x[:, keep].contiguous(), x[:, outliers].contiguous()


def int8_decomp_reference(
    x: torch.Tensor,
    outliers: torch.Tensor,
    w8_kn: torch.Tensor,
    w_scale: torch.Tensor,
    w_out: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x[M, K] -> [M, N]: INT8 over the normal channels (w8_kn [K - Ko, N]) + float over w_out [Ko, N]."""
    x_n, x_o = split_columns(x, outliers)
    q, s = quantize_per_token_reference(x_n)
    return int8_decomp_gemm_reference(q, s, w8_kn, w_scale, x_o, w_out, bias, x.dtype)


def int8_decomp_gemm_reference(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w8_kn: torch.Tensor,
    w_scale: torch.Tensor,
    x_out: torch.Tensor,
    w_out: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The CPU path of `int8_decomp_gemm`: `torch._int_mm` for the INT8 part, a float32 matmul for the rest."""
    y = int8_gemm_reference(q, a_scale, w8_kn, w_scale, bias, torch.float32)
    y.addmm_(x_out.to(torch.float32), w_out.to(torch.float32))
    return y.to(out_dtype)


@torch.library.custom_op("qpass::int8_decomp_gemm", mutates_args=())
def int8_decomp_gemm(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w8_kn: torch.Tensor,
    w_scale: torch.Tensor,
    x_out: torch.Tensor,
    w_out: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y[M, N] = (q @ w8_kn) * a_scale[:, None] * w_scale[None, :] + x_out @ w_out + bias.

    Triton (one launch) on CUDA, the torch reference elsewhere.
    """
    if use_triton(q, w8_kn):
        return int8_decomp_triton(q, a_scale, w8_kn, w_scale, x_out, w_out, bias, out_dtype)
    return int8_decomp_gemm_reference(q, a_scale, w8_kn, w_scale, x_out, w_out, bias, out_dtype)


@int8_decomp_gemm.register_fake
def _(q, a_scale, w8_kn, w_scale, x_out, w_out, bias, out_dtype):
    return q.new_empty((q.shape[0], w8_kn.shape[1]), dtype=out_dtype)


if HAS_TRITON:

    @triton.jit
    def _decomp_kernel(
        q_ptr,
        w8_ptr,
        sa_ptr,
        sw_ptr,
        xo_ptr,
        wo_ptr,
        bias_ptr,
        c_ptr,
        M,
        N,
        KN,
        KO,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, KN, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                q_ptr + rm[:, None].to(tl.int64) * KN + kk[None, :],
                mask=mmask[:, None] & (kk[None, :] < KN),
                other=0,
            )
            b = tl.load(
                w8_ptr + kk[:, None].to(tl.int64) * N + rn[None, :],
                mask=(kk[:, None] < KN) & nmask[None, :],
                other=0,
            )
            acc += tl.dot(a, b, out_dtype=tl.int32)
        sa = tl.load(sa_ptr + rm, mask=mmask, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        ro = tl.arange(0, BLOCK_O)
        for o0 in range(0, KO, BLOCK_O):
            oo = o0 + ro
            xo = tl.load(
                xo_ptr + rm[:, None].to(tl.int64) * KO + oo[None, :],
                mask=mmask[:, None] & (oo[None, :] < KO),
                other=0.0,
            )
            wo = tl.load(
                wo_ptr + oo[:, None].to(tl.int64) * N + rn[None, :],
                mask=(oo[:, None] < KO) & nmask[None, :],
                other=0.0,
            )
            y += tl.dot(xo.to(tl.float32), wo.to(tl.float32), input_precision="ieee")
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :],
            y.to(c_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )


def int8_decomp_triton(
    q: torch.Tensor,
    a_scale: torch.Tensor,
    w8_kn: torch.Tensor,
    w_scale: torch.Tensor,
    x_out: torch.Tensor,
    w_out: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One launch: int8 q[M, Kn] @ w8_kn[Kn, N] (scaled) + x_out[M, Ko] @ w_out[Ko, N] + bias."""
    check_launchable("int8_decomp_gemm", q, w8_kn)
    m, kn = q.shape
    ko = x_out.shape[1]
    n = w8_kn.shape[1]
    if w8_kn.shape[0] != kn or w_out.shape != (ko, n) or x_out.shape[0] != m:
        msg = (
            f"int8_decomp_gemm: shapes q {tuple(q.shape)}, w8 {tuple(w8_kn.shape)}, x_out {tuple(x_out.shape)}, "
            f"w_out {tuple(w_out.shape)} do not line up as [M, Kn] @ [Kn, N] + [M, Ko] @ [Ko, N]"
        )
        raise ConfigError(msg)
    # no autotuning yet: one tile that suits H100 int8 tensor cores; small tiles in the interpreter
    bm, bn, bk = blocks or ((32, 32, 32) if interpreting() else (64, 128, 128))
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    _decomp_kernel[(cdiv(m, bm), cdiv(n, bn))](
        q.contiguous(),
        w8_kn.contiguous(),
        a_scale.reshape(-1).float().contiguous(),
        w_scale.reshape(-1).float().contiguous(),
        x_out.contiguous(),
        w_out.contiguous(),
        bias.contiguous() if bias is not None else out,
        out,
        m,
        n,
        kn,
        ko,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_O=16,
    )
    return out
