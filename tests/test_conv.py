"""Conv layers quantized on torch.fx and ONNX: every Conv in the report, ORT runs integer conv.

A small random conv net (Conv -> BN -> ReLU -> depthwise dilated Conv -> grouped Conv -> pool ->
Gemm) is exported with torch.onnx.export and captured with torch.export, quantized with the
built-in recipes, and run: ONNX in a stock onnxruntime session (its optimized graph is read back
from `SessionOptions.optimized_model_filepath`), fx as the lowered GraphModule. Ops the recipe
leaves in float (ConvTranspose, an activation x activation MatMul) must be reported with a reason.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from qpass.api import quantize_with_report
from qpass.errors import UnsupportedOpError
from qpass.lowering.torch_conv import QuantConv
from qpass.quant.qlinear import dequantize_weight, fake_quant_act

# measured on ConvNet (seeded), max relative L2 error vs FP32 over 4 evaluation batches:
# w8a8 ONNX 0.29%, fx 0.35%; w8a8-dynamic 0.41% both; int4 per-channel weight-only 2.4% both
W8A8_TOL = 0.015
W4_TOL = 0.06


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.pw = nn.Conv2d(16, 24, 1, groups=2, bias=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = self.pw(torch.relu(self.dw(h)))
        return self.fc(h.mean((2, 3)))


class MixedNet(nn.Module):
    """A 1-D conv, an activation x activation MatMul, a ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        att = torch.softmax(h.transpose(1, 2) @ h, -1)
        return self.up(h @ att)


def _net(cls) -> nn.Module:
    torch.manual_seed(0)
    m = cls().eval()
    if isinstance(m, ConvNet):
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
            m.bn.weight.uniform_(0.5, 1.5)
    return m


def _images(n: int, seed: int, shape=(2, 3, 32, 32)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _onnx(model: nn.Module, x: torch.Tensor, path) -> onnx.ModelProto:
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=True)
    return onnx.load(str(path))


def _ort_optimized(proto: onnx.ModelProto, tmp_path) -> tuple[ort.InferenceSession, collections.Counter]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _notes(res) -> dict[str, tuple[bool, str]]:
    return {n.site: (n.applied, n.detail) for n in res.report.results[-1].plan.notes}


@pytest.fixture(scope="module")
def convnet():
    return _net(ConvNet)


def test_w8a8_onnx_every_conv_quantized_and_ort_runs_qlinearconv(convnet, tmp_path):
    calib, evals = _images(8, 1), _images(4, 2)
    proto = _onnx(convnet, calib[0], tmp_path / "net.onnx")
    n_conv = sum(n.op_type == "Conv" for n in proto.graph.node)
    assert n_conv == 3
    res = quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib])
    notes = _notes(res)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert all(notes[c][0] and notes[c][1].startswith("conv [") for c in convs), notes
    assert sum(applied for applied, _ in notes.values()) == n_conv + 1  # + the Gemm
    sess, ops = _ort_optimized(res.model, tmp_path)
    assert ops["QLinearConv"] == n_conv, ops
    assert "Conv" not in ops and "FusedConv" not in ops, ops
    fp = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    errs = [_rel(sess.run(None, {"x": x.numpy()})[0], fp.run(None, {"x": x.numpy()})[0]) for x in evals]
    assert max(errs) < W8A8_TOL, errs


def test_w8a8_fx_every_conv_quantized_close_to_fp(convnet):
    calib, evals = _images(8, 1), _images(4, 2)
    res = quantize_with_report(convnet, "w8a8", calib)
    notes = _notes(res)
    convs = [s for s, (ok, d) in notes.items() if d.startswith("conv [")]
    assert len(convs) == 3 and all(notes[c][0] for c in convs), notes
    mods = [m for m in res.model.modules() if isinstance(m, QuantConv)]
    assert len(mods) == 3 and all(m.out_qparams is not None for m in mods)
    assert {m.groups for m in mods} == {1, 16, 2}
    with torch.no_grad():
        errs = [_rel(res.model(x), convnet(x)) for x in evals]
    assert max(errs) < W8A8_TOL, errs


def test_exported_program_input_and_onnx_both_close_to_fp(tmp_path):
    """An ExportedProgram input (fx) and the ONNX export of the same net, each against FP32."""
    model = _net(ConvNet)
    calib = _images(4, 3)
    proto = _onnx(model, calib[0], tmp_path / "net.onnx")
    res = quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib])
    sess, _ = _ort_optimized(res.model, tmp_path)
    qpass_fx = quantize_with_report(torch.export.export(model, (calib[0],)), "w8a8", calib).model
    # not the same graph (ONNX folds BN into the conv), so compare each with FP rather than each other
    x = calib[1]
    ref = model(x).detach().numpy()
    assert _rel(sess.run(None, {"x": x.numpy()})[0], ref) < W8A8_TOL
    assert _rel(qpass_fx(x).detach().numpy(), ref) < W8A8_TOL


def test_single_conv_onnx_equals_reference_arithmetic(tmp_path):
    """One Conv: ORT's output equals Q_out(conv(Q_a(x), dequant(W))) from the plan, to a code step."""
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1).eval()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 8 * 8, 3)).eval()
    calib = _images(4, 5, (2, 4, 16, 16))
    proto = _onnx(model, calib[0], tmp_path / "one.onnx")
    res = quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib])
    q = next(e.qlinear for e in res.report.results[-1].plan.edits if e.qlinear.is_conv)
    w = dequantize_weight(q.codes, q.scales, q.zero_points).reshape(q.conv_shape)
    x = calib[1]
    y = torch.nn.functional.conv2d(fake_quant_act(x, q.act, q.act_qparams), w, conv.bias, 2, 1)
    codes = torch.clamp(torch.round(y / q.out_qparams.scale) + q.out_qparams.zero_point, 0, 255)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    flat = ((codes - q.out_qparams.zero_point) * q.out_qparams.scale).flatten(1)
    lin = next(e.qlinear for e in res.report.results[-1].plan.edits if not e.qlinear.is_conv)
    ref = fake_quant_act(flat, lin.act, lin.act_qparams) @ lin.dequantized_weight().T + model[2].bias
    assert _rel(sess.run(None, {"x": x.numpy()})[0], ref.detach().numpy()) < 2e-3


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w4a16-ch"])
def test_dynamic_and_weight_only_conv(convnet, tmp_path, recipe):
    calib, evals = _images(4, 1), _images(2, 2)
    spec = (
        recipe
        if recipe != "w4a16-ch"
        else {
            "name": "w4a16-ch",
            "passes": [],
            "weights": {"format": "int4", "symmetric": False},
            "activations": None,
        }
    )
    proto = _onnx(convnet, calib[0], tmp_path / "net.onnx")
    res = quantize_with_report(proto, spec, [{"x": x.numpy()} for x in calib])
    notes = _notes(res)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert all(notes[c][0] for c in convs), notes
    if recipe == "w8a8-dynamic":
        assert all("per_tensor dynamic" in notes[c][1] for c in convs), notes
    sess, _ = _ort_optimized(res.model, tmp_path)
    fp = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    tol = W8A8_TOL if recipe == "w8a8-dynamic" else W4_TOL
    for x in evals:
        assert _rel(sess.run(None, {"x": x.numpy()})[0], fp.run(None, {"x": x.numpy()})[0]) < tol
    fx = quantize_with_report(convnet, spec, calib).model
    assert sum(isinstance(m, QuantConv) for m in fx.modules()) == 3
    with torch.no_grad():
        assert max(_rel(fx(x), convnet(x)) for x in evals) < tol


def test_report_lists_conv_transpose_and_activation_matmul(tmp_path):
    model = _net(MixedNet)
    calib = _images(4, 6, (2, 4, 12))
    proto = _onnx(model, calib[0], tmp_path / "mixed.onnx")
    for res in (
        quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib]),
        quantize_with_report(model, "w8a8", calib),
    ):
        notes = _notes(res)
        quantized = [d for ok, d in notes.values() if ok]
        assert len(quantized) == 1 and quantized[0].startswith("conv [8x4x3]"), notes
        skipped = [d for ok, d in notes.values() if not ok]
        assert sum("transposed convolution" in d for d in skipped) == 1, notes
        assert sum("both operands are activations" in d for d in skipped) == 2, notes


def test_conv3d_quantized_on_both_graph_kinds(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), nn.ReLU(), nn.Conv3d(4, 4, 1)
    ).eval()
    calib = _images(4, 8, (1, 2, 4, 8, 8))
    proto = _onnx(model, calib[0], tmp_path / "c3.onnx")
    for res in (
        quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib]),
        quantize_with_report(model, "w8a8", calib),
    ):
        applied = [d for ok, d in _notes(res).values() if ok]
        assert len(applied) == 2 and all(d.startswith("conv [4x") for d in applied), applied
    onnx_q = quantize_with_report(proto, "w8a8", [{"x": x.numpy()} for x in calib]).model
    sess = ort.InferenceSession(onnx_q.SerializeToString(), providers=["CPUExecutionProvider"])
    x = calib[1]
    # the last conv's output leaves the graph, so only its input is quantized
    assert _rel(sess.run(None, {"x": x.numpy()})[0], model(x).detach().numpy()) < W8A8_TOL


def _grouped_recipe(group: int) -> dict:
    return {
        "name": f"w4a16-g{group}",
        "passes": [],
        "weights": {"format": "int4", "group": group, "symmetric": False},
        "activations": None,
    }


def test_grouped_int4_conv_weights_use_blocked_dequantize_at_opset_21(tmp_path):
    """Groups of 32 along in/groups * kh * kw = 72 (the last one short): DequantizeLinear(block_size) + Reshape."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = _images(2, 10, (1, 8, 10, 10))
    path = tmp_path / "g.onnx"
    torch.onnx.export(model, (calib[0],), str(path), input_names=["x"], dynamo=True, opset_version=21)
    proto = onnx.load(str(path))
    res = quantize_with_report(proto, _grouped_recipe(32), [{"x": x.numpy()} for x in calib])
    notes = [d for ok, d in _notes(res).values() if ok]
    assert len(notes) == 2 and all("w:int4/g32" in d for d in notes), notes
    blocked = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(blocked) == 2 and all(
        a.name == "block_size" and a.i == 32 for n in blocked for a in n.attribute if a.name == "block_size"
    )
    assert {i.data_type for i in res.model.graph.initializer if i.name.endswith("_quantized")} == {
        onnx.TensorProto.UINT4
    }
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    fx = quantize_with_report(model, _grouped_recipe(32), calib).model
    x = calib[1]
    with torch.no_grad():
        ref = model(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        print("grouped int4 conv: rel err vs FP", _rel(got, ref), "ORT vs fx", _rel(got, fx(x).numpy()))
        assert (
            _rel(got, ref) < 0.15
        )  # measured 9.2%: 4-bit weights on a 2-conv random net, no activation quantization
        assert _rel(got, fx(x).numpy()) < 1e-5  # one arithmetic


def test_grouped_conv_weights_below_opset_21_are_refused_with_the_fix(tmp_path):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(8, 4, 3)).eval()
    calib = _images(1, 10, (1, 8, 10, 10))
    proto = _onnx(model, calib[0], tmp_path / "g20.onnx")
    with pytest.raises(UnsupportedOpError, match="opset 21"):
        quantize_with_report(proto, _grouped_recipe(32), [{"x": x.numpy()} for x in calib])


def test_gptq_recipe_reports_convs_left_in_float(convnet, tmp_path):
    calib = _images(4, 1)
    proto = _onnx(convnet, calib[0], tmp_path / "net.onnx")
    for res in (
        quantize_with_report(proto, "w4a16-gptq", [{"x": x.numpy()} for x in calib]),
        quantize_with_report(convnet, "w4a16-gptq", calib),
    ):
        notes = _notes(res)
        skipped = [d for ok, d in notes.values() if not ok]
        assert len(skipped) == 3 and all("im2col Hessian" in d for d in skipped), notes
        assert sum(ok for ok, _ in notes.values()) == 1  # the Gemm / linear


def test_quantized_conv_net_saves_and_loads_as_pt2(convnet, tmp_path):
    """Saving reads the codes (no float weight cache in the file) and the loaded program matches."""
    from qpass.saved_model import load_quantized, save_quantized

    calib = _images(4, 1)
    q = quantize_with_report(convnet, "w8a8", calib).model
    save_quantized(q, tmp_path / "conv.pt2", calib[0])
    loaded = load_quantized(tmp_path / "conv.pt2").module
    x = calib[2]
    with torch.no_grad():
        assert _rel(loaded(x), q(x)) < 1e-6
    for m in q.modules():
        if isinstance(m, QuantConv):
            assert torch.equal(m.dequantized(), m._weight)
