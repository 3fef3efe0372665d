"""W4A16 GEMM: packed INT4 weights (two per byte), group-wise scales and zero points, optional
act-order `g_idx`, dequantized in registers; split-K for decode-size M. Torch twin beside it.

Layout (`pack_int4`): nibbles u in [0, 15] of the [N, K] weight, row-major, the even input
channel in the low nibble (`qpass.formats.pack_bits` order, rows padded to an even K), so
packed is uint8 [N, ceil(K/2)]. value = (u - z[n, g(k)]) * s[n, g(k)]: asymmetric codes keep
their zero points, symmetric codes c in [-8, 7] are stored as u = c + 8 with z = 8.
Decode (small M) is weight-bandwidth bound: splitting K over more programs keeps all SMs
reading; the partial sums land in an fp32 [SPLIT_K, M, N] buffer summed afterwards
(deterministic, unlike atomics).
"""

from __future__ import annotations

import torch

from qpass.errors import ConfigError
from qpass.formats import pack_bits, unpack_bits
from qpass.kernels._triton import HAS_TRITON, cdiv, check_launchable, interpreting, tl, triton, use_triton

SYMMETRIC_OFFSET = 8


def pack_int4(codes: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """int8 [-8, 7] (symmetric) or uint8 [0, 15] codes [N, K] -> uint8 [N, ceil(K/2)]."""
    if codes.dim() != 2:
        msg = f"pack_int4: codes must be [N, K], got shape {tuple(codes.shape)}"
        raise ConfigError(msg)
    u = (codes.to(torch.int16) + (SYMMETRIC_OFFSET if symmetric else 0)).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, u.new_zeros(u.shape[0], 1)], dim=1)
    return pack_bits(u, 4).reshape(u.shape[0], u.shape[1] // 2)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> nibbles uint8 [N, K]."""
    n = packed.shape[0]
    return unpack_bits(packed, 4, n * packed.shape[1] * 2).reshape(n, -1)[:, :k]


def _groups(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return g_idx if g_idx is not None else torch.arange(k, device=device) // group_size


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 [N, K] weight the kernel dequantizes in registers."""
    u = unpack_int4(packed, k).to(torch.float32)
    g = _groups(k, group_size, g_idx, packed.device)
    z = SYMMETRIC_OFFSET if zeros is None else zeros.to(torch.float32)[:, g]
    return (u - z) * scales.to(torch.float32)[:, g]


def w4a16_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x[M, K] @ dequant(W)^T in float32, returned in x's dtype."""
    w = dequantize_int4(packed, scales, zeros, x.shape[-1], group_size, g_idx)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


@torch.library.custom_op("qpass::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Return x @ dequant(packed INT4)^T: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x, packed):
        return w4a16_triton(x, packed, scales, zeros, g_idx, group_size)
    return w4a16_reference(x, packed, scales, zeros, g_idx, group_size)


@w4a16_gemm.register_fake
def _(x, packed, scales, zeros, g_idx, group_size):
    return x.new_empty((x.shape[0], packed.shape[0]))


# Autotune candidates on CUDA: small-M tiles (16 rows: decode) with long K steps, and two larger
# tiles for prefill. SPLIT_K is chosen by `split_k_for` from the grid size, not tuned.
W4A16_CONFIGS = (
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
)


def split_k_for(m: int, n: int, k: int, block_n: int = 64, block_k: int = 128, sms: int = 132) -> int:
    """Split K until the grid fills the GPU at decode sizes (M <= 16); 1 when M tiles already do."""
    if m > 16:
        return 1
    tiles = cdiv(n, block_n)
    split = 1
    while tiles * split < sms and k // (block_k * split * 2) >= 1 and split < 16:
        split *= 2
    return split


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        g_ptr,
        out_ptr,
        M,
        N,
        K,
        K2,
        G,
        GROUP,
        HAS_ZP: tl.constexpr,
        HAS_GIDX: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_steps = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_steps, SPLIT_K)
        for step in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_steps)):
            kk = step * BLOCK_K + rk
            kmask = kk < K
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * K + kk[None, :],
                mask=(rm[:, None] < M) & kmask[None, :],
                other=0.0,
            )
            wmask = kmask[:, None] & (rn[None, :] < N)
            byte = tl.load(w_ptr + rn[None, :].to(tl.int64) * K2 + (kk // 2)[:, None], mask=wmask, other=0)
            u = ((byte >> ((kk % 2) * 4)[:, None].to(tl.uint8)) & 0xF).to(tl.float32)
            if HAS_GIDX:
                g = tl.load(g_ptr + kk, mask=kmask, other=0)
            else:
                g = kk // GROUP
            sg = rn[None, :].to(tl.int64) * G + g[:, None]
            s = tl.load(s_ptr + sg, mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + sg, mask=wmask, other=0).to(tl.float32)
            else:
                z = 8.0
            w = ((u - z) * s).to(x.dtype)
            acc += tl.dot(x, w)
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=omask)

    _w4a16_tuned = triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k.isupper()},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in W4A16_CONFIGS
        ],
        key=["M", "N", "K", "SPLIT_K"],
    )(_w4a16_kernel)


def w4a16_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
    *,
    blocks: tuple[int, int, int] | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Launch the W4A16 GEMM on x[M, K]; `blocks`/`split_k` fix the tiling (interpreter, tests)."""
    check_launchable("w4a16_gemm", x, packed)
    m, k = x.shape
    n, k2 = packed.shape
    if k2 != (k + 1) // 2 or packed.dtype != torch.uint8:
        msg = (
            f"w4a16_gemm: packed weight must be uint8 [N, ceil(K/2)] for K={k}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
        raise ConfigError(msg)
    if blocks is None and interpreting():
        blocks = (16, 32, 32)
    split = split_k if split_k is not None else split_k_for(m, n, k)
    x = x.contiguous()
    common = (
        packed.contiguous(),
        scales.contiguous(),
        zeros.contiguous() if zeros is not None else scales,
        g_idx.to(torch.int32).contiguous() if g_idx is not None else scales,
    )
    out = (
        torch.empty((m, n), dtype=x.dtype, device=x.device)
        if split == 1
        else x.new_empty((split, m, n), dtype=torch.float32)
    )
    flags = {"HAS_ZP": zeros is not None, "HAS_GIDX": g_idx is not None, "SPLIT_K": split}
    sizes = (m, n, k, k2, scales.shape[1], group_size)
    if blocks is not None:
        bm, bn, bk = blocks
        _w4a16_kernel[(cdiv(m, bm), cdiv(n, bn), split)](
            x, *common, out, *sizes, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk
        )
    else:

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), split)

        _w4a16_tuned[grid](x, *common, out, *sizes, **flags)
    return out if split == 1 else out.sum(0).to(x.dtype)
