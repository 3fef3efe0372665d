"""Quantized weights (`QLinear`) as the initializers of ONNX weight-only ops.

Two layouts, both numpy-only and checked against ONNX Runtime in tests/test_onnx_lowering.py:

- com.microsoft ``MatMulNBits`` (ContribOperators.md): ``B`` uint8 ``[N, k_blocks, blob]`` with
  ``blob = block_size * bits / 8`` and, at 4 bits, element ``2i`` in the low nibble of byte ``i``;
  ``scales`` ``[N, k_blocks]``; ``zero_points`` uint8 ``[N, ceil(k_blocks * bits / 8)]`` packed
  the same way (absent: ``2^(bits-1)``); ``g_idx`` int32 ``[K]``, the scale block of each input
  channel. With ``g_idx``, ORT 1.32's CPU kernel ignores packed uint8 zero points (it applies
  the default 2^(bits-1); found by the identity-input probe in the tests), but honours
  zero points given as float ``[N, k_blocks]`` in the same formula ``(q - zp) * scale``: act-order
  asymmetric weights use those, and so do float zero points (``weights.float_zero_point``).
  Codes narrower than 4 bits use the 4-bit container, 5..7 bits the 8-bit one: the
  dequantized values are unchanged.
- ONNX opset 21 ``DequantizeLinear`` with ``block_size``: codes ``[K, N]`` as int4/uint4 (<= 4 bits)
  or int8/uint8, scales ``[ceil(K / block), N]``; act-order ``g_idx`` becomes a permutation of the
  input channels that makes every group contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from qpass.quant.qlinear import QLinear

NBITS_BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block sizes: powers of two in [16, 256]
PER_CHANNEL_BLOCK = 128  # per-channel scales are repeated over blocks of this size


@dataclass(frozen=True)
class PackedNBits:
    """MatMulNBits initializers and attributes."""

    b: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] (float32 [N, k_blocks]
    # with g_idx); None: 2^(bits-1)
    g_idx: np.ndarray | None  # int32 [K]
    k: int
    n: int
    bits: int
    block_size: int


@dataclass(frozen=True)
class BlockedDQ:
    """Blocked DequantizeLinear initializers; `order` permutes the activation's last axis."""

    codes: np.ndarray  # [K, N] int4/uint4/int8/uint8
    scales: np.ndarray  # float32 [ceil(K / block), N], or [N] per channel
    zero_points: np.ndarray | None  # same shape and width as the codes' type; None: symmetric
    block_size: int | None  # None: per output channel (axis 1)
    order: np.ndarray | None  # int64 [K]: x[..., order] @ W[order, :]
    axis: int = 0  # the blocked axis of [K, N]: 0 (groups of input channels) or 1 (AdaDim: of outputs)


def container_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        msg = f"weights of {bits} bits have no ONNX container (2..8 bits)"
        raise ValueError(msg)
    return 4 if bits <= 4 else 8


def _unsigned_codes(q: QLinear, cbits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes as unsigned [N, K] and zero points [N, groups] (None: the default 2^(cbits-1))."""
    codes = q.codes.numpy()
    if q.zero_points is None:
        return (codes.astype(np.int16) + (1 << (cbits - 1))).astype(np.uint8), None
    if q.zero_points.is_floating_point():  # float zero points (formats' float_zero_point) stay float
        return codes.astype(np.uint8), q.zero_points.numpy().astype(np.float32)
    return codes.astype(np.uint8), q.zero_points.numpy().astype(np.uint8)


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """[..., 2m] uint8 values < 16 -> [..., m] bytes, even index in the low nibble."""
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def nbits_block_size(q: QLinear) -> int:
    """Largest MatMulNBits block that tiles each scale group (the group itself when allowed)."""
    k = q.codes.shape[1]
    if q.group_size is None or q.group_size >= k:
        return PER_CHANNEL_BLOCK
    for b in NBITS_BLOCKS:
        if q.group_size % b == 0:
            return b
    msg = f"recipe key 'weights.group': {q.group_size} has no power-of-two divisor in 16..256 (MatMulNBits blocks)"
    raise ValueError(msg)


def matmulnbits_arrays(q: QLinear) -> PackedNBits:
    """Pack `q` for MatMulNBits; ValueError (naming the key) when the layout has no form there."""
    cbits = container_bits(q.bits)
    n, k = q.codes.shape
    block = nbits_block_size(q)
    k_blocks = -(-k // block)
    group = q.group_size if q.group_size is not None and q.group_size < k else k
    reps = group // block if group < k else k_blocks  # blocks per scale group
    block_group = np.arange(k_blocks) // reps if group < k else np.zeros(k_blocks, np.int64)
    u, zp = _unsigned_codes(q, cbits)
    scales = q.scales.numpy().astype(np.float32)[:, block_group]
    pad = k_blocks * block - k
    if pad:
        if zp is None:
            fill = np.full((n, 1), 1 << (cbits - 1), np.uint8)
        else:  # the padded inputs are zero; any code in range will do, the zero point's nearest
            fill = np.clip(np.rint(zp[:, -1:]), 0, (1 << cbits) - 1).astype(np.uint8)
        u = np.concatenate([u, np.repeat(fill[:, :1], pad, axis=1)], axis=1)
    u = u.reshape(n, k_blocks, block)
    b = _pack_nibbles(u) if cbits == 4 else u
    zp_packed = None
    if zp is not None:
        zp_blocks = zp[:, block_group]
        if q.g_idx is not None or zp_blocks.dtype.kind == "f":  # MatMulNBits: in the scales' type
            zp_packed = zp_blocks.astype(np.float32)
        else:
            zp_packed = _pack_nibbles(zp_blocks) if cbits == 4 else zp_blocks
    g_idx = None
    if q.g_idx is not None:
        g_idx = (q.g_idx.numpy().astype(np.int64) * (reps if group < k else 0)).astype(np.int32)
    return PackedNBits(
        np.ascontiguousarray(b),
        np.ascontiguousarray(scales),
        None if zp_packed is None else np.ascontiguousarray(zp_packed),
        g_idx,
        k,
        n,
        cbits,
        block,
    )


def act_order_permutation(q: QLinear) -> np.ndarray | None:
    """The permutation making `q`'s act-order groups contiguous, or None (no g_idx, or groups of
    unequal size: then only MatMulNBits' g_idx input can express them).
    """
    try:
        return _act_order(q)
    except ValueError:
        return None


def _act_order(q: QLinear) -> np.ndarray | None:
    """The input-channel permutation that makes act-order groups contiguous (None: already)."""
    if q.g_idx is None:
        return None
    g = q.g_idx.numpy().astype(np.int64)
    order = np.argsort(g, kind="stable")
    k = g.size
    if not np.array_equal(g[order], np.arange(k) // q.group_size):
        msg = "g_idx groups are not of equal size 'weights.group'; use weight_op: matmulnbits"
        raise ValueError(msg)
    return order


def blocked_dq_arrays(q: QLinear) -> BlockedDQ:
    """Codes/scales/zero points for DequantizeLinear with `block_size` along K."""
    cbits = container_bits(q.bits)
    signed = q.zero_points is None
    if not signed and q.zero_points.is_floating_point():
        msg = (
            "float zero points have no DequantizeLinear form (its zero point takes the codes' type); "
            "use weight_op: matmulnbits"
        )
        raise ValueError(msg)
    dtype = {
        (4, True): ml_dtypes.int4,
        (4, False): ml_dtypes.uint4,
        (8, True): np.int8,
        (8, False): np.uint8,
    }[(cbits, signed)]
    zp_dtype = dtype
    if q.group_axis == "out":  # scales [out_groups, in]: blocks of output columns of [K, N]
        codes_kn = np.ascontiguousarray(q.codes.numpy().T).astype(dtype)
        scales = np.ascontiguousarray(q.scales.numpy().astype(np.float32).T)
        zp = None if signed else np.ascontiguousarray(q.zero_points.numpy().T).astype(zp_dtype)
        return BlockedDQ(codes_kn, scales, zp, q.group_size, None, axis=1)
    order = _act_order(q)
    codes = q.codes.numpy()
    if order is not None:
        codes = codes[:, order]
    codes_kn = np.ascontiguousarray(codes.T).astype(dtype)
    scales = q.scales.numpy().astype(np.float32)
    zp = None if signed else q.zero_points.numpy().astype(dtype)
    if q.per_channel:
        return BlockedDQ(codes_kn, scales[:, 0].copy(), None if zp is None else zp[:, 0].copy(), None, order)
    return BlockedDQ(
        codes_kn,
        np.ascontiguousarray(scales.T),
        None if zp is None else np.ascontiguousarray(zp.T),
        q.group_size,
        order,
    )
