"""AdaDim: weight groups along the output rows (one input column's group of rows shares a scale),
chosen per layer by the calibrated output error; lowered on torch and ONNX (blocked
DequantizeLinear with blocks along N; MatMulNBits refuses with the key to change).
"""

from __future__ import annotations

import pytest
import torch
from test_onnx_lowering import inputs, linear_model, quantize, rel_max, run

import qpass
from qpass.errors import ConfigError, UnsupportedOpError
from qpass.qconfig import WeightQuantConfig
from qpass.quant.lorc import layer_error
from qpass.quant.qlinear import dequantize_weight, weight_spec
from qpass.quant.rtn import rtn, rtn_out_groups
from qpass.quant.weight_quant import adaptive_dim, quantize_weight


def _salient_weight(out: int = 64, inp: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few salient input columns (x30) and inputs of equal variance."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=gen)
    w[:, [3, 40, 77]] *= 30.0
    x = torch.randn(512, inp, generator=gen)
    return w, x.T @ x


def test_out_groups_dequantize_and_beat_in_groups_on_salient_columns():
    w, xtx = _salient_weight()
    cfg = WeightQuantConfig(format="int4", group=16, group_axis="out")
    spec = weight_spec(cfg)
    out = rtn_out_groups(w, spec)
    assert out.codes.shape == w.shape and out.scales.shape == (64 // 16, 96)
    # the layout is rtn of W^T, transposed back
    torch.testing.assert_close(out.dequantized(), rtn(w.T.contiguous(), spec).dequantized().T)
    torch.testing.assert_close(
        dequantize_weight(out.codes, out.scales, out.zero_points, None, None, "out"), out.dequantized()
    )
    usual = rtn(w, spec)
    assert layer_error(w, out.dequantized(), xtx) < 0.8 * layer_error(w, usual.dequantized(), xtx)
    auto = adaptive_dim(w, WeightQuantConfig(format="int4", group=16, group_axis="auto"), spec, xtx)
    assert auto.group_axis == "out"
    # without salient columns but with salient rows the usual groups win
    w_rows = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    w_rows[[2, 30]] *= 30.0
    chosen = quantize_weight(
        w_rows, WeightQuantConfig(format="int4", group=16, group_axis="auto"), spec, xtx
    ).qweight
    assert chosen.group_axis == "in"


def test_config_validation():
    with pytest.raises(ConfigError, match=r"weights\.group_axis"):
        WeightQuantConfig(format="int4", group=None, group_axis="out")
    with pytest.raises(ConfigError, match=r"weights\.group_axis"):
        WeightQuantConfig(format="int4", group=32, group_axis="rows")
    with pytest.raises(ConfigError, match=r"weights\.group_axis.*weights\.algo"):
        WeightQuantConfig(format="int4", group=32, group_axis="auto", algo="gptq")
    assert WeightQuantConfig(format="int4", group=32, group_axis="auto").needs_hessian
    recipe = qpass.get_recipe({"weights": {"format": "int3", "group": 32, "group_axis": "auto"}})
    assert recipe.weights.group_axis == "auto"
    assert qpass.get_recipe("w4a16-adadim").weights.group_axis == "auto"


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_blocked_dequantize_linear_along_n(symmetric):
    k = 192
    model, b = linear_model(k, opset=21)
    x = inputs(k)
    wcfg = {"format": "int4", "group": 8, "symmetric": symmetric, "group_axis": "out"}
    out_model, q = quantize(model, {"weights": wcfg, "lowering": {"weight_op": "dequantize_linear"}}, x)
    assert q.group_axis == "out"
    dq = next(n for n in out_model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 1, "block_size": 8}
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5
    # auto lowering takes the same blocked DequantizeLinear; MatMulNBits refuses with the key
    auto_model, _ = quantize(model, {"weights": wcfg}, x)
    assert "MatMulNBits" not in {n.op_type for n in auto_model.graph.node}
    with pytest.raises(UnsupportedOpError, match=r"lowering\.weight_op.*group_axis"):
        quantize(model, {"weights": wcfg, "lowering": {"weight_op": "matmulnbits"}}, x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_row_groups_below_opset_21_use_per_axis_dequantize(symmetric):
    """Opset 18 has no blocked DequantizeLinear: W [K, N] viewed as [K * N/g, g] with one scale per
    row (per-axis DequantizeLinear) and reshaped back gives the same weight.
    """
    k = 192
    model, b = linear_model(k, opset=18)
    x = inputs(k)
    wcfg = {"format": "int4", "group": 8, "symmetric": symmetric, "group_axis": "out"}
    out_model, q = quantize(model, {"weights": wcfg, "lowering": {"optimize": False}}, x)
    ops = [n.op_type for n in out_model.graph.node]
    assert "DequantizeLinear" in ops and "Reshape" in ops and "MatMulNBits" not in ops
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5


def test_torch_lowering_auto_on_a_model(llama_case):
    """TinyLlama through the torch target, INT3 g32 auto: layers pick either axis (the 48-wide head,
    which 32-row groups do not divide, keeps the usual groups), and each lowered module computes
    x @ dequant(W)^T with its own layout.
    """
    x = llama_case.batches[-1]
    recipe = {"weights": {"format": "int3", "group": 32, "group_axis": "auto"}, "target": "torch"}
    q = qpass.quantize(llama_case.model, recipe, llama_case.batches[:2])
    lowered = [m for m in q.modules() if type(m).__name__ == "QuantLinear"]
    axes = {m.group_axis for m in lowered}
    assert axes == {"in", "out"}, axes
    for m in lowered:
        inp = torch.randn(3, m._weight.shape[1])
        w = dequantize_weight(m.weight_codes, m.weight_scales, m.weight_zero_points, None, None, m.group_axis)
        torch.testing.assert_close(m(inp), inp @ w.T + (0 if m.bias is None else m.bias))
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all()
