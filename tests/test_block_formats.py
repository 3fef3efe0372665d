"""Float and block formats (FP8, MXFP4/8, MXINT8, NVFP4, BFP) as recipe weight/activation formats:
planned per linear from the qpass.formats references and run by the torch lowering.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qpass
from qpass.errors import ConfigError
from qpass.formats import fake_quantize, get_format
from qpass.lowering.torch_backend import QuantLinear
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import fake_quant_act
from qpass.recipe import Recipe


def _recipe(wfmt: str, afmt: str | None, target: str = "torch") -> Recipe:
    acts = None if afmt is None else {"format": afmt, "dynamic": True}
    return Recipe.from_dict({"weights": {"format": wfmt}, "activations": acts, "target": target})


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxint8", "fp8_e4m3", "bfp12"])
def test_block_weights_equal_format_reference(llama_case, fmt):
    """Each QuantLinear's weight is exactly the formats reference of the FP weight along `in`."""
    fp_weights = {
        n: m.weight.detach().clone() for n, m in llama_case.model.named_modules() if hasattr(m, "weight")
    }
    q = qpass.quantize(llama_case.model, _recipe(fmt, None), llama_case.batches)
    qlinears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert qlinears
    spec = get_format(fmt)
    spec = spec.replace(axis=0 if spec.granularity.value == "per_channel" else -1)
    matched = 0
    for m in qlinears:
        cands = [w for w in fp_weights.values() if w.shape == m._weight.shape]
        ref = [fake_quantize(w.float(), spec) for w in cands]
        assert any(torch.equal(m._weight, r) for r in ref), f"{fmt}: a weight is not the format's reference"
        matched += 1
        assert m.weight_codes.dtype in (torch.uint8, torch.int8)
    assert matched == len(qlinears)


def test_block_activations_run_and_order_by_precision(llama_case):
    """W/A in MXFP8 tracks FP far better than MXFP4 or NVFP4 (the model amplifies: OCP MX clamps
    block maxima above the element max, ~5% weight error for MXFP8 on random weights).
    """
    batch = llama_case.batches[0]
    ref = llama_case.reference(batch)
    errs = {}
    for fmt in ("mxfp8", "mxfp4", "nvfp4"):
        q = qpass.quantize(llama_case.model, _recipe(fmt, fmt), llama_case.batches)
        with torch.no_grad():
            out = q(*llama_case.torch_args(batch))
        out = out[0] if isinstance(out, tuple | list) else out
        errs[fmt] = float((out - ref).norm() / ref.norm())
    assert 0 < errs["mxfp8"] < 0.4
    assert errs["mxfp8"] < errs["mxfp4"] / 2 and errs["mxfp8"] < errs["nvfp4"] / 2
    assert errs["nvfp4"] < 1.0 and errs["mxfp4"] < 1.0


def test_block_activation_fake_quant_is_blockwise():
    x = torch.randn(3, 5, 64)
    x[..., 7] *= 100.0  # one outlier channel: only its own 32-block loses resolution
    cfg = ActivationQuantConfig(format="mxfp4", dynamic=True)
    y = fake_quant_act(x, cfg, None)
    assert torch.equal(y, fake_quantize(x, get_format("mxfp4").replace(axis=-1)))
    err = (y - x).abs()
    assert err[..., 32:].max() < err[..., :32].max() / 10


def test_block_format_config_errors():
    with pytest.raises(ConfigError, match="weights.group"):
        WeightQuantConfig(format="mxfp4", group=64)
    with pytest.raises(ConfigError, match="weights.symmetric"):
        WeightQuantConfig(format="nvfp4", symmetric=False)
    with pytest.raises(ConfigError, match="activations.dynamic"):
        ActivationQuantConfig(format="mxfp4")


def test_block_weights_lower_to_onnx(bert_case, onnx_dir):
    """ONNX target: a qpass function op decodes the MXFP4 weights (tests/test_onnx_block_formats.py)."""
    import onnxruntime as ort

    q = qpass.quantize(
        str(bert_case.onnx_path(onnx_dir)), _recipe("mxfp4", "mxfp4", "onnxruntime"), bert_case.onnx_calib()
    )
    assert any(n.op_type == "DequantizeMXFP4" and n.domain == "qpass" for n in q.graph.node)
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, bert_case.onnx_feed(bert_case.batches[0]))[0]
    assert out.shape == tuple(bert_case.reference(bert_case.batches[0]).shape)
    assert np.isfinite(out).all()


def test_block_weights_take_reference_kernel_and_save(llama_case, tmp_path):
    """FP8 per channel has 8-bit codes but is no INT8: never the integer kernels; saved and loaded
    (packed-only forward decodes the bit patterns) the outputs are unchanged.
    """
    from qpass.lowering.torch_backend import LinearKernel
    from qpass.saved_model import load_quantized, save_quantized

    for fmt, kernel in (("fp8_e4m3", LinearKernel.REFERENCE), ("mxfp4", LinearKernel.MX)):
        q = qpass.quantize(llama_case.model, _recipe(fmt, None), llama_case.batches)
        kernels = {m.kernel for m in q.modules() if isinstance(m, QuantLinear)}
        assert kernels == {kernel}
    batch = llama_case.batches[0]
    save_quantized(q, tmp_path / "m.pt2", batch)
    loaded = load_quantized(tmp_path / "m.pt2").module
    with torch.no_grad():
        a = q(*llama_case.torch_args(batch))
        b = loaded(*llama_case.torch_args(batch))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("wfmt", "afmt"), [("mxfp4", None), ("nvfp4", None), ("mxfp8", "mxfp8"), ("nvfp4", "nvfp4")]
)
def test_mx_kernel_layout_decodes_to_the_reference_weight(llama_case, wfmt, afmt):
    """The MX kernel's packed elements and re-encoded scale bytes decode to exactly the weight the
    reference path uses; the packed-only forward (CPU op) and the Triton kernel (interpreter)
    agree with the reference forward.
    """
    from qpass.kernels.mx_gemm import dequantize_mx, mx_gemm_triton
    from qpass.lowering.torch_backend import LinearKernel

    q = qpass.quantize(llama_case.model, _recipe(wfmt, afmt), llama_case.batches)
    mods = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert mods and {m.kernel for m in mods} == {LinearKernel.MX}
    torch.manual_seed(0)
    for m in mods[:3]:
        assert torch.equal(dequantize_mx(m._mx), m._weight)
        x = torch.randn(5, m._weight.shape[1])
        ref = m(x)
        m.packed_only = True
        try:
            packed = m(x)
        finally:
            m.packed_only = False
        torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    m = mods[0]
    x = torch.randn(3, m._weight.shape[1])
    xq = x if m.act is None else fake_quant_act(x, m.act, None)
    y = mx_gemm_triton(xq, m._mx) + (0 if m.bias is None else m.bias)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)
