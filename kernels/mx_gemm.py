"""MX (MXFP4 / MXFP8, E8M0 scales per block of 32) and NVFP4 (E4M3 scales per block of 16 times
a float32 tensor scale) weight GEMM, elements and scales decoded in registers; torch twin beside it.

The weight is what `qpass.formats.quantize` gives for an [N, K] tensor with blocks along K:
uint8 element bit patterns (FP4 E2M1 packed two per byte by `pack_mx_weight`, FP8 E4M3 one per
byte) and one uint8 scale byte per block. `qpass.formats.dequantize` is the ground truth.
Activations stay float (fp16/bf16/fp32); the product accumulates in fp32.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from qpass.errors import ConfigError
from qpass.formats import ElementType, QuantizedTensor, QuantSpec, ScaleType, decode_e8m0, decode_float
from qpass.formats.e8m0 import encode_e8m0
from qpass.formats.elements import encode_float
from qpass.kernels._triton import HAS_TRITON, cdiv, check_launchable, interpreting, tl, triton, use_triton
from qpass.kernels.w4a16 import pack_int4, unpack_int4


class MxElement(enum.IntEnum):
    """Element encodings the kernel decodes (values are the kernel's constexpr codes)."""

    FP4_E2M1 = 0
    FP8_E4M3 = 1


class MxScale(enum.IntEnum):
    """Scale encodings the kernel decodes."""

    E8M0 = 0
    E4M3 = 1


MX_ELEMENTS = {ElementType.FP4_E2M1: MxElement.FP4_E2M1, ElementType.FP8_E4M3: MxElement.FP8_E4M3}
MX_SCALES = {ScaleType.E8M0: MxScale.E8M0, ScaleType.E4M3: MxScale.E4M3}


@dataclass(frozen=True)
class MxWeight:
    """A block-scaled weight in the kernel's layout."""

    data: torch.Tensor  # uint8 [N, ceil(K/2)] (FP4) or [N, K] (FP8)
    scale_bits: torch.Tensor  # uint8 [N, ceil(K / group)]
    tensor_scale: float  # NVFP4's float32 tensor scale; 1.0 for MX
    element: MxElement
    scale: MxScale
    group: int
    k: int


def pack_mx_weight(qt: QuantizedTensor) -> MxWeight:
    """A `qpass.formats` MXFP4 / MXFP8 (E4M3) / NVFP4 quantized [N, K] weight in kernel layout."""
    spec = qt.spec
    if qt.codes.dim() != 2 or spec.element not in MX_ELEMENTS or spec.scale_type not in MX_SCALES:
        msg = (
            f"mx_gemm: expects an [N, K] mxfp4, mxfp8 (e4m3) or nvfp4 weight, got {spec.element.value} "
            f"with {spec.scale_type.value} scales, shape {tuple(qt.codes.shape)}"
        )
        raise ConfigError(msg)
    element = MX_ELEMENTS[spec.element]
    data = pack_int4(qt.codes, symmetric=False) if element is MxElement.FP4_E2M1 else qt.codes.contiguous()
    ts = 1.0 if qt.tensor_scale is None else float(qt.tensor_scale)
    return MxWeight(
        data,
        qt.scale_bits.contiguous(),
        ts,
        element,
        MX_SCALES[spec.scale_type],
        spec.group_size,
        qt.codes.shape[1],
    )


def pack_mx_codes(
    codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, tensor_scale: float | None
) -> MxWeight:
    """The kernel layout from decoded per-block scales (a `QLinear`'s codes and float32 scales).

    E8M0 scales are exact powers of two; NVFP4's are e4m3 values times `tensor_scale`, so
    dividing by it and rounding to E4M3 recovers the byte the quantizer chose.
    """
    if spec.scale_type is ScaleType.E8M0:
        bits = encode_e8m0(scales.to(torch.float32))
        ts = 1.0
    else:
        if tensor_scale is None:
            msg = "mx_gemm: NVFP4 (E4M3 scales) needs the tensor scale"
            raise ConfigError(msg)
        bits = encode_float(scales.to(torch.float32) / tensor_scale, ElementType.FP8_E4M3)
        ts = float(tensor_scale)
    element = MX_ELEMENTS[spec.element]
    data = pack_int4(codes, symmetric=False) if element is MxElement.FP4_E2M1 else codes.contiguous()
    return MxWeight(
        data,
        bits.to(torch.uint8).contiguous(),
        ts,
        element,
        MX_SCALES[spec.scale_type],
        spec.group_size,
        codes.shape[1],
    )


def dequantize_mx(w: MxWeight) -> torch.Tensor:
    """The float32 [N, K] weight the kernel decodes in registers."""
    codes = unpack_int4(w.data, w.k) if w.element is MxElement.FP4_E2M1 else w.data
    et = ElementType.FP4_E2M1 if w.element is MxElement.FP4_E2M1 else ElementType.FP8_E4M3
    values = decode_float(codes, et)
    if w.scale is MxScale.E8M0:
        scale = decode_e8m0(w.scale_bits)
    else:
        scale = decode_float(w.scale_bits, ElementType.FP8_E4M3) * w.tensor_scale
    g = torch.arange(w.k, device=codes.device) // w.group
    return values * scale.to(torch.float32)[:, g]


def mx_gemm_reference(x: torch.Tensor, w: MxWeight) -> torch.Tensor:
    """x[M, K] @ dequant(W)^T in float32, returned in x's dtype."""
    return (x.to(torch.float32) @ dequantize_mx(w).T).to(x.dtype)


@torch.library.custom_op("qpass::mx_gemm", mutates_args=())
def mx_gemm(
    x: torch.Tensor,
    data: torch.Tensor,
    scale_bits: torch.Tensor,
    tensor_scale: float,
    element: int,
    scale: int,
    group: int,
) -> torch.Tensor:
    """Return x @ dequant(block-scaled W)^T: Triton on CUDA, the torch reference elsewhere."""
    k = x.shape[-1]
    w = MxWeight(data, scale_bits, tensor_scale, MxElement(element), MxScale(scale), group, k)
    if use_triton(x, data):
        return mx_gemm_triton(x, w)
    return mx_gemm_reference(x, w)


@mx_gemm.register_fake
def _(x, data, scale_bits, tensor_scale, element, scale, group):
    return x.new_empty((x.shape[0], data.shape[0]))


# Autotune candidates on CUDA: as for W4A16 (the same memory-bound decode and compute-bound
# prefill regimes); the block of K must stay a multiple of the scale group (16 or 32).
MX_GEMM_CONFIGS = (
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
)

if HAS_TRITON:

    @triton.jit
    def decode_e2m1(c):
        """FP4 E2M1 bit pattern (uint8, low 4 bits) -> float32: s.ee.m, bias 1, subnormal 0.5 * m."""
        mag = c & 7
        e = (mag >> 1).to(tl.float32)
        m = (mag & 1).to(tl.float32)
        v = tl.where(e == 0.0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2(e - 1.0))
        return tl.where((c & 8) != 0, -v, v)

    @triton.jit
    def decode_e4m3(c):
        """FP8 E4M3 (fn) bit pattern -> float32: s.eeee.mmm, bias 7, subnormal m/8 * 2^-6."""
        e = ((c >> 3) & 15).to(tl.float32)
        m = (c & 7).to(tl.float32)
        v = tl.where(e == 0.0, m * 0.001953125, (1.0 + m * 0.125) * tl.exp2(e - 7.0))
        return tl.where((c & 128) != 0, -v, v)

    @triton.jit
    def _mx_gemm_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        out_ptr,
        M,
        N,
        K,
        KB,
        G,
        tensor_scale,
        GROUP: tl.constexpr,
        FP4: tl.constexpr,
        E8M0: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            kmask = kk < K
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * K + kk[None, :],
                mask=(rm[:, None] < M) & kmask[None, :],
                other=0.0,
            )
            wmask = kmask[:, None] & (rn[None, :] < N)
            row = rn[None, :].to(tl.int64) * KB
            if FP4:
                byte = tl.load(w_ptr + row + (kk // 2)[:, None], mask=wmask, other=0)
                v = decode_e2m1((byte >> ((kk % 2) * 4)[:, None].to(tl.uint8)) & 0xF)
            else:
                v = decode_e4m3(tl.load(w_ptr + row + kk[:, None], mask=wmask, other=0))
            sb = tl.load(s_ptr + rn[None, :].to(tl.int64) * G + (kk // GROUP)[:, None], mask=wmask, other=127)
            if E8M0:
                s = tl.exp2(sb.to(tl.float32) - 127.0)
            else:
                s = decode_e4m3(sb) * tensor_scale
            acc += tl.dot(x, (v * s).to(x.dtype))
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(
            out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask
        )

    _mx_gemm_tuned = triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k.isupper()},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in MX_GEMM_CONFIGS
        ],
        key=["M", "N", "K"],
    )(_mx_gemm_kernel)


def mx_gemm_triton(
    x: torch.Tensor, w: MxWeight, *, blocks: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Launch the block-scaled GEMM on x[M, K]; `blocks` fixes the tiling (interpreter, tests)."""
    check_launchable("mx_gemm", x, w.data)
    m, k = x.shape
    if k != w.k:
        msg = f"mx_gemm: x has K={k}, the weight K={w.k}"
        raise ConfigError(msg)
    n = w.data.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if blocks is None and interpreting():
        blocks = (16, 32, 32)
    args = (
        x.contiguous(),
        w.data,
        w.scale_bits,
        out,
        m,
        n,
        k,
        w.data.shape[1],
        w.scale_bits.shape[1],
        w.tensor_scale,
    )
    flags = {"GROUP": w.group, "FP4": w.element is MxElement.FP4_E2M1, "E8M0": w.scale is MxScale.E8M0}
    if blocks is not None:
        bm, bn, bk = blocks
        _mx_gemm_kernel[(cdiv(m, bm), cdiv(n, bn))](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return out

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))

    _mx_gemm_tuned[grid](*args, **flags)
    return out
