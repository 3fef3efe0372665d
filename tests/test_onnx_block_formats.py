"""ONNX lowering of the float and block formats (FP8, MX, NVFP4, BFP) in stock onnxruntime.

The references are `qpass.formats`: the FakeQuant function ops must reproduce `fake_quant_act`
bit for bit, the Dequantize function ops `QLinear.dequantized_weight()` bit for bit, and whole
lowered models the torch target's quantized model of the same recipe (same codes; only float
summation order differs).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.api import quantize_with_report
from qpass.errors import UnsupportedOpError
from qpass.formats import get_format
from qpass.lowering.onnx_block_formats import _e4m3_bytes
from qpass.lowering.onnx_block_functions import fake_quant_function, format_tag
from qpass.lowering.onnx_nodes import QPASS_DOMAIN
from qpass.qconfig import BLOCK_FORMATS, ActivationQuantConfig
from qpass.quant.qlinear import dynamic_spec, fake_quant_act
from qpass.recipe import Recipe

N_OUT = 48


def _session(model: onnx.ModelProto, **config: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_function(fn: ir.Function, x: np.ndarray, opset: int) -> np.ndarray:
    """One function-op node over input x, in a model of `opset`."""
    xv = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node(fn.name, [xv], domain=QPASS_DOMAIN, name="fq")
    out = node.outputs[0]
    out.name, out.shape, out.type = "y", ir.Shape(x.shape), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([xv], [out], nodes=[node], opset_imports={"": opset, QPASS_DOMAIN: 1}, name="g")
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10, functions=[fn]))
    onnx.checker.check_model(proto, full_check=True)
    return _session(proto).run(None, {"x": x})[0]


def _hard_inputs() -> torch.Tensor:
    """Outlier channel, an all-zero block, tiny and huge blocks, exact powers of two and their
    float32 neighbours (where a rounded log2 is one off), values on rounding ties.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 64, generator=g) * 3
    x[..., 7] *= 100.0
    x[0, 0, :32] = 0.0
    x[1, 1] *= 1e-20
    x[2, 2, :16] *= 1e12
    p = 2.0 ** torch.arange(-8, 8, dtype=torch.float32)
    x[3, 0, :16] = p
    x[3, 1, :16] = torch.nextafter(p, torch.zeros_like(p))
    x[3, 2, :16] = -torch.nextafter(p, torch.full_like(p, 1e9))
    x[3, 3, :32] = torch.arange(32, dtype=torch.float32) * 0.25 + 0.125  # ties of fine grids
    return x


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_fake_quant_function_is_bit_exact(fmt):
    x = _hard_inputs()
    cfg = ActivationQuantConfig(format=fmt, dynamic=True)
    ref = fake_quant_act(x, cfg, None).numpy()
    for opset in (13, 18):  # ReduceMax takes axes as an attribute before 18, an input from 18
        out = _run_function(fake_quant_function(dynamic_spec(cfg), opset), x.numpy(), opset)
        np.testing.assert_array_equal(out, ref, err_msg=f"{fmt} opset {opset}")


def test_nvfp4_tensor_scale_is_recovered_exactly():
    w = torch.randn(32, 64) * torch.logspace(-3, 3, 64)
    qt = get_format("nvfp4").quantize(w)
    found = _e4m3_bytes(qt.scale.numpy())
    assert found is not None
    bits, ts = found
    np.testing.assert_array_equal(bits, qt.scale_bits.numpy())
    assert ts == qt.tensor_scale.numpy()


# ------------------------------------------------------------------------------ whole models


def linear_model(k: int, opset: int = 18) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A linear x [B, T, K] -> MatMul(W) + b -> y, W with an outlier input channel."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, N_OUT)).astype(np.float32)
    w[5] *= 10.0
    b = rng.standard_normal(N_OUT).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", N_OUT])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), w, b


def _x(k: int) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((3, 5, k)).astype(np.float32)
    x[..., 3] *= 25.0
    x[0, 1] = 0.0
    return x


def _quantize(model, recipe, x):
    res = quantize_with_report(model, recipe, {"x": x}, verify=False)
    (q,) = [e.qlinear for e in res.report.results[-1].plan.edits]
    return res.model, q


def _linear_weight_bytes(model: onnx.ModelProto, exclude: set[str]) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name not in exclude)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_linear_equals_reference(fmt):
    """Weights and activations in `fmt`: the lowered linear is fake_quant_act(x) @ dequant(W)^T + b,
    the decoding function op stays in the file (not folded back to float) and the file shrinks.
    """
    k = 256
    model, w, b = linear_model(k)
    x = _x(k)
    out_model, q = _quantize(
        model, {"weights": {"format": fmt}, "activations": {"format": fmt, "dynamic": True}}, x
    )
    ops = collections.Counter(n.op_type for n in out_model.graph.node)
    tag = format_tag(q.spec)
    assert ops[f"Dequantize{tag}"] == 1 and ops[f"FakeQuant{format_tag(dynamic_spec(q.act))}"] == 1, ops
    assert ops["MatMul"] == 1 and "W" not in {t.name for t in out_model.graph.initializer}
    ref = (fake_quant_act(torch.from_numpy(x), q.act, None) @ q.dequantized_weight().T).numpy() + b
    out = _session(out_model).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # compact storage: element bits (4-bit in a 4-bit container, 6 in 8) + one scale byte per block
    stored = _linear_weight_bytes(out_model, {"b"})
    et = q.spec.element
    bits = 4 if et.bits <= 4 else 8
    scale_bytes = 4 * N_OUT if q.spec.group_size is None else (k // q.spec.group_size) * N_OUT + 4
    assert stored <= k * N_OUT * bits // 8 + scale_bytes, (fmt, stored)


def test_decoded_weight_is_bit_exact():
    """The Dequantize function op's output is the reference dequantized weight, for each format; the op
    stays in the file even where its inputs are under the optimizer's constant-folding size limit.
    """
    k = 128
    for fmt in BLOCK_FORMATS:
        model, _, _ = linear_model(k)
        out_model, q = _quantize(model, {"weights": {"format": fmt}}, _x(k))
        dq = next(n for n in out_model.graph.node if n.domain == QPASS_DOMAIN)
        probe = onnx.ModelProto()
        probe.CopyFrom(out_model)
        probe.graph.ClearField("output")
        probe.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
        wq = _session(probe).run(None, {"x": _x(k)})[0]
        np.testing.assert_array_equal(wq, q.dequantized_weight().numpy().T, err_msg=fmt)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "mxfp8", "mxint8", "bfp16", "bfp12"])
def test_dequantize_linear_option(fmt):
    """`weight_op: dequantize_linear`: standard DequantizeLinear where ORT's CPU kernel takes the types."""
    k = 256
    model, w, b = linear_model(k, opset=21)
    x = _x(k)
    recipe = {"weights": {"format": fmt}, "lowering": {"weight_op": "dequantize_linear"}}
    out_model, q = _quantize(model, recipe, x)
    ops = [n.op_type for n in out_model.graph.node]
    assert ops == ["DequantizeLinear", "MatMul", "Add"], ops
    ref = x @ q.dequantized_weight().numpy().T + b
    # ORT fuses int4/int8 blocked DequantizeLinear + MatMul into MatMulNBits, by default with int8
    # activations (accuracy level 4, ~5% error here); level 1 keeps them float
    out = _session(out_model, **{"session.qdq_matmulnbits_accuracy_level": "1"}).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_weight_op_errors_name_the_key():
    model, _, _ = linear_model(64, opset=21)
    for fmt, op, match in (
        ("mxfp4", "dequantize_linear", r"lowering\.weight_op.*no MXFP4 form"),
        ("nvfp4", "matmulnbits", r"lowering\.weight_op.*matmulnbits takes integer weights"),
    ):
        with pytest.raises(UnsupportedOpError, match=match):
            _quantize(model, {"weights": {"format": fmt}, "lowering": {"weight_op": op}}, _x(64))
    model18, _, _ = linear_model(64)
    with pytest.raises(UnsupportedOpError, match=r"opset >= 21.*opset 18"):
        _quantize(
            model18, {"weights": {"format": "mxfp8"}, "lowering": {"weight_op": "dequantize_linear"}}, _x(64)
        )


# ------------------------------------------------------------------------------ against the torch target


def _recipe(fmt: str, target: str) -> Recipe:
    return Recipe.from_dict(
        {"weights": {"format": fmt}, "activations": {"format": fmt, "dynamic": True}, "target": target}
    )


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_tiny_llama_onnx_matches_torch_target(llama_case, onnx_dir, fmt):
    """The lowered TinyLlama (ONNX, stock ORT) against the torch target's quantized model: the ORT
    output differs from torch's by far less than quantization moves it from FP32.
    """
    path = llama_case.onnx_path(onnx_dir)
    q_onnx = qpass.quantize(str(path), _recipe(fmt, "onnxruntime"), llama_case.onnx_calib(), verify=False)
    onnx.checker.check_model(q_onnx, full_check=True)
    q_torch = qpass.quantize(llama_case.model, _recipe(fmt, "torch"), llama_case.batches, verify=False)
    sess = _session(q_onnx)
    batch = llama_case.batches[-1]
    with torch.no_grad():
        ref = llama_case.reference(batch).numpy()
        out_t = q_torch(*llama_case.torch_args(batch))
    out_t = (out_t[0] if isinstance(out_t, tuple | list) else out_t).numpy()
    out_o = sess.run(None, llama_case.onnx_feed(batch))[0]
    gap = np.linalg.norm(out_o - out_t) / np.linalg.norm(out_t)
    noise = np.linalg.norm(out_t - ref) / np.linalg.norm(ref)
    assert gap < max(1e-4, noise / 20), (fmt, gap, noise)


@pytest.mark.parametrize(
    ("wcfg", "afmt", "op"),
    [
        ({"format": "int4", "group": 32}, "mxfp4", "MatMulNBits"),
        ({"format": "int8"}, "nvfp4", "MatMulNBits"),
        ({"format": "fp8_e4m3"}, "int8", "DequantizeFP8E4M3"),
    ],
    ids=["int4-w-mxfp4-a", "int8-w-nvfp4-a", "fp8-w-int8-token-a"],
)
def test_mixed_integer_and_block_formats(wcfg, afmt, op):
    """Integer weights with block-format activations take MatMulNBits after the FakeQuant op (never
    the integer-activation forms); block weights with INT8 per-token activations fake-quantize them.
    """
    k = 128
    model, _, b = linear_model(k)
    x = _x(k)
    acfg = {"format": afmt, "dynamic": True}
    if afmt == "int8":
        acfg["granularity"] = "per_token"
    out_model, q = _quantize(model, {"weights": wcfg, "activations": acfg}, x)
    ops = collections.Counter(n.op_type for n in out_model.graph.node)
    assert ops[op] == 1 and ops["MatMulInteger"] == 0 and ops["QuantizeLinear"] == 0, ops
    ref = (fake_quant_act(torch.from_numpy(x), q.act, None) @ q.dequantized_weight().T).numpy() + b
    out = _session(out_model).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_scales_without_a_byte_form_stay_float32(fmt):
    """Scales that are not exact E8M0 / E4M3 x tensor-scale values (e.g. from another algorithm)
    are stored as float32 blocks for the F32Scales variant of the op; the weight is still exact.
    """
    import dataclasses

    from qpass.graph.onnx import OnnxGraphView
    from qpass.graph.onnx_load import load_model
    from qpass.lowering.onnx_finalize import finalize_onnx
    from qpass.qconfig import WeightQuantConfig
    from qpass.quant.qlinear import QuantPlan, plan_quantization
    from qpass.registry import lower

    k = 64
    model, _, b = linear_model(k)
    view = OnnxGraphView(load_model(model))
    plan = plan_quantization(view, None, WeightQuantConfig(format=fmt), None)
    (edit,) = plan.edits
    edit.qlinear.scales = edit.qlinear.scales * torch.linspace(1.01, 1.3, edit.qlinear.scales.shape[1])
    fixed = QuantPlan("quantize", [dataclasses.replace(edit)])
    lower(view, fixed)
    finalize_onnx(view.model)
    out_model = view.to_proto()
    ops = [n.op_type for n in out_model.graph.node]
    assert f"Dequantize{fmt.upper()}F32Scales" in ops, ops
    x = _x(k)
    ref = x @ edit.qlinear.dequantized_weight().numpy().T + b
    np.testing.assert_allclose(_session(out_model).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-4)
