"""Every Triton kernel against its torch reference on random shapes with tails (M, N, K not
multiples of the block), run by Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1
where there is no GPU) with small blocks so each tail path is exercised.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from qpass.errors import ConfigError  # noqa: E402
from qpass.formats import Granularity, QuantSpec  # noqa: E402
from qpass.formats.elements import ElementType  # noqa: E402
from qpass.kernels._triton import interpreting  # noqa: E402
from qpass.kernels.hadamard import hadamard_reference, hadamard_triton, kernel_supports  # noqa: E402
from qpass.kernels.w4a16 import dequantize_int4, pack_int4, unpack_int4, w4a16_reference, w4a16_triton  # noqa: E402
from qpass.kernels.w8a8 import (  # noqa: E402
    int8_gemm,
    int8_gemm_reference,
    int8_gemm_triton,
    quantize_per_token,
    quantize_per_token_reference,
    quantize_per_token_triton,
)
from qpass.math.hadamard import random_signs, randomized_hadamard  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="CPU needs TRITON_INTERPRET=1 before triton is imported"
)


def _shapes(seed: int, count: int, lo: int = 1, hi: int = 80) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(v) for v in torch.randint(lo, hi, (3,), generator=g)) for _ in range(count)]


@pytest.mark.parametrize("n", [1, 2, 8, 64, 12, 48, 20, 80, 28, 12 * 64])
def test_fwht_matches_reference_and_dense_matrix(n):
    x = torch.randn(7, n, device=DEVICE)
    s = random_signs(n, n).to(torch.float32).to(DEVICE)
    y = hadamard_triton(x, s)
    torch.testing.assert_close(y, hadamard_reference(x, s), rtol=1e-5, atol=1e-5)
    dense = x.double() @ randomized_hadamard(n, n).to(DEVICE)
    torch.testing.assert_close(y.double(), dense, rtol=1e-5, atol=1e-5)


def test_fwht_batched_half_precision_and_limits():
    x = torch.randn(2, 3, 40, device=DEVICE, dtype=torch.float16)
    s = random_signs(40, 1).to(DEVICE)
    y = hadamard_triton(x, s)
    assert y.shape == x.shape and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), hadamard_reference(x.float(), s), rtol=2e-3, atol=2e-3)
    assert kernel_supports(11008 // 43 * 28) and not kernel_supports(11008) and not kernel_supports(36 * 4)
    with pytest.raises(ConfigError, match="base"):
        hadamard_triton(torch.randn(2, 36, device=DEVICE), torch.ones(36, device=DEVICE))


@pytest.mark.parametrize(("m", "_n", "k"), _shapes(1, 4))
def test_per_token_quant_is_bit_exact(m, _n, k):
    x = torch.randn(m, k, device=DEVICE) * torch.rand(m, 1, device=DEVICE) * 10
    x[0] = 0.0  # an all-zero row keeps scale 1
    q, s = quantize_per_token_triton(x)
    qr, sr = quantize_per_token_reference(x)
    assert q.dtype == torch.int8 and torch.equal(q, qr) and torch.equal(s, sr)
    # the reference is qpass.formats' per-token INT8 (the ground truth for fake quantization)
    spec = QuantSpec(ElementType("int8"), Granularity.PER_TOKEN, symmetric=True)
    torch.testing.assert_close(q.float() * s[:, None], spec.fake_quantize(x), rtol=0, atol=0)


def test_per_token_quant_ties_round_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], device=DEVICE)  # scale is exactly 1
    q, _ = quantize_per_token_triton(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("k", [16, 128])
def test_per_token_quant_fused_with_hadamard(k):
    x = torch.randn(9, k, device=DEVICE)
    x[:, 3] *= 40  # an outlier channel the rotation spreads out
    signs = random_signs(k, 5).to(torch.float32).to(DEVICE)
    q, s = quantize_per_token_triton(x, signs)
    qr, sr = quantize_per_token_reference(hadamard_reference(x, signs))
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 0.01
    with pytest.raises(ConfigError, match="power-of-two"):
        quantize_per_token_triton(torch.randn(2, 12, device=DEVICE), torch.ones(12, device=DEVICE))


@pytest.mark.parametrize(("m", "n", "k"), [*_shapes(2, 3), (1, 17, 5), (33, 1, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_gemm_epilogue(m, n, k, dtype):
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEVICE)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=DEVICE)
    sa, sw = torch.rand(m, device=DEVICE) / 100 + 1e-3, torch.rand(n, device=DEVICE) / 100 + 1e-3
    bias = torch.randn(n, device=DEVICE) if m % 2 else None
    y = int8_gemm_triton(q, sa, w, sw, bias, dtype, blocks=(16, 16, 16))
    assert y.dtype == dtype and y.shape == (m, n)
    exact = (q.double() @ w.double()) * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        exact = exact + bias.double()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)
    ref = int8_gemm_reference(
        q.cpu(), sa.cpu(), w.cpu(), sw.cpu(), None if bias is None else bias.cpu(), dtype
    )
    torch.testing.assert_close(y.cpu().double(), ref.double(), rtol=tol, atol=tol)


def test_int8_ops_trace_with_fake_impls():
    x = torch.randn(5, 24)
    w = torch.randint(-127, 128, (24, 7), dtype=torch.int8)

    def f(x, w, ws):
        q, s = quantize_per_token(x)
        return int8_gemm(q, s, w, ws, None, torch.float32)

    ws = torch.rand(7)
    gm = torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(x, w, ws)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (
        torch.ops.qpass.int8_gemm.default in targets and torch.ops.qpass.quantize_per_token.default in targets
    )
    torch.testing.assert_close(gm(x, w, ws), f(x, w, ws))


def _int4_case(n: int, k: int, group: int, symmetric: bool, act_order: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    if symmetric:
        codes = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
        zeros = None
    else:
        codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
        zeros = torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8)
    scales = torch.rand(n, groups, generator=g) / 10 + 0.01
    g_idx = (torch.randperm(k, generator=g) // group).to(torch.int32) if act_order else None
    return codes, scales, zeros, g_idx


def test_int4_pack_round_trip_and_dequant():
    codes, scales, zeros, g_idx = _int4_case(6, 13, 4, False, True, 0)
    packed = pack_int4(codes, symmetric=False)
    assert packed.shape == (6, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 13), codes)
    w = dequantize_int4(packed, scales, zeros, 13, 4, g_idx)
    gi = g_idx.long()
    torch.testing.assert_close(w, (codes.float() - zeros.float()[:, gi]) * scales[:, gi])


@pytest.mark.parametrize(
    ("m", "n", "k", "group", "symmetric", "act_order", "split_k"),
    [
        (1, 40, 70, 16, True, False, 3),
        (3, 17, 64, 32, False, False, 1),
        (19, 33, 45, 8, False, True, 2),
        (2, 24, 96, 32, True, True, 4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_gemm(m, n, k, group, symmetric, act_order, split_k, dtype):
    codes, scales, zeros, g_idx = _int4_case(n, k, group, symmetric, act_order, m + n)
    packed = pack_int4(codes, symmetric)
    x = torch.randn(m, k).to(dtype)
    dev = [t.to(DEVICE) if t is not None else None for t in (x, packed, scales, zeros, g_idx)]
    y = w4a16_triton(*dev, group, blocks=(16, 16, 16), split_k=split_k)
    ref = w4a16_reference(x, packed, scales, zeros, g_idx, group)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize(("m", "n", "k"), [(5, 33, 96), (17, 20, 160)])
def test_block_scaled_gemm_matches_formats_reference(fmt, m, n, k):
    from qpass.formats import dequantize, get_format, quantize
    from qpass.kernels.mx_gemm import dequantize_mx, mx_gemm_reference, mx_gemm_triton, pack_mx_weight

    g = torch.Generator().manual_seed(m * n)
    w_fp = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]  # wide scale range
    qt = quantize(w_fp, get_format(fmt))
    w = pack_mx_weight(qt)
    assert torch.equal(dequantize_mx(w), dequantize(qt))  # decoding equals qpass.formats bit for bit
    x = torch.randn(m, k, generator=g)
    on_device = dataclasses.replace(w, data=w.data.to(DEVICE), scale_bits=w.scale_bits.to(DEVICE))
    y = mx_gemm_triton(x.to(DEVICE), on_device, blocks=(16, 16, 64))
    ref = mx_gemm_reference(x, w)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(ref, x @ dequantize(qt).T, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_block_scaled_gemm_rejects_other_formats():
    from qpass.formats import get_format, quantize
    from qpass.kernels.mx_gemm import pack_mx_weight

    with pytest.raises(ConfigError, match="mx_gemm: expects"):
        pack_mx_weight(quantize(torch.randn(4, 64), get_format("mxint8")))


@pytest.mark.parametrize(("m", "n", "k", "n_out"), [(7, 20, 50, 3), (33, 45, 70, 17)])
def test_int8_decomposition_gemm(m, n, k, n_out):
    from qpass.kernels.int8_decomp import int8_decomp_reference, int8_decomp_triton, split_columns

    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[:n_out]
    x[:, outliers] *= 50.0
    w8 = torch.randint(-127, 128, (k - n_out, n), generator=g).to(torch.int8)
    ws = torch.rand(n, generator=g) / 100
    w_out = torch.randn(n_out, n, generator=g)
    bias = torch.randn(n, generator=g)
    ref = int8_decomp_reference(x, outliers, w8, ws, w_out, bias)
    x_n, x_o = split_columns(x, outliers)
    q, s = quantize_per_token_reference(x_n)
    dev = [t.to(DEVICE) for t in (q, s, w8, ws, x_o, w_out, bias)]
    y = int8_decomp_triton(*dev, torch.float32, blocks=(16, 16, 16))
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-4)
    # the decomposition keeps the outliers out of the INT8 scales: closer to FP than plain per-token INT8
    w_full = torch.zeros(k, n)
    keep = torch.ones(k, dtype=torch.bool)
    keep[outliers] = False
    w_full[keep] = w8.float() * ws
    w_full[outliers] = w_out
    exact = x @ w_full + bias
    plain_q, plain_s = quantize_per_token_reference(x)
    plain = (plain_q.float() * plain_s[:, None]) @ w_full + bias
    assert (ref - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()


@pytest.mark.parametrize("path", ["int_mm", "float"])
@pytest.mark.parametrize(("m", "k", "n"), [(32, 576, 40), (17, 2500, 24)])
def test_int8_matmul_cpu_paths_are_exact(monkeypatch, path, m, k, n):
    """Both CPU paths of the int8 GEMM equal an int64 reference bit for bit, full int8 range and
    K past one exact float32 chunk (2500 > 1024) included.
    """
    import qpass.kernels.w8a8 as w8a8

    monkeypatch.setitem(w8a8._CPU_INT8_PATH, "path", path)
    g = torch.Generator().manual_seed(m + k)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    out = w8a8.int8_matmul(q, w)
    assert out.dtype == torch.int32
    assert torch.equal(out.to(torch.int64), q.to(torch.int64) @ w.to(torch.int64))
