"""The real CNN: EfficientNet-Lite2 (64 Conv, ReLU6, depthwise) on real photos, quantized by qpass.

`w8a8` must quantize every Conv (each listed in the report, none left silently), run in stock
onnxruntime with integer conv kernels in its optimized graph, and stay close to FP32 on held-out
photos. Equalization must be exact on the real graph; `w8a8-cle` (equalization + bias correction)
must run and agree with FP32 at least as well as plain `w8a8` less a small noise margin.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qpass.api import quantize_with_report
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.onnx_load import load_model
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.equalize import CrossLayerEqualization, EqualizeConfig
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig

# measured (32 held-out crops, 32 calibration crops): w8a8 top-1 agreement 0.875, logit cosine 0.985
MIN_TOP1, MIN_COS = 0.75, 0.97


def _session(model: onnx.ModelProto, tmp_path, name: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return sess, ops


def _agreement(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    return float((y.argmax(1) == ref.argmax(1)).mean()), float(cos.mean())


@pytest.fixture(scope="module")
def fp32(efficientnet_onnx, photo_crops):
    path, _ = efficientnet_onnx
    proto = onnx.load(path)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, sess.run(None, {"x": photo_crops[1]})[0]


def test_w8a8_quantizes_every_conv_and_ort_runs_integer_convs(fp32, photo_crops, tmp_path):
    proto, ref = fp32
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 64
    res = quantize_with_report(proto, "w8a8", photo_crops[0])
    notes = {n.site: n for n in res.report.results[-1].plan.notes}
    missing = [c for c in convs if c not in notes or not notes[c].applied]
    assert not missing, missing
    assert all(notes[c].detail.startswith("conv [") for c in convs)
    assert not [n for n in notes.values() if not n.applied], "an op was left in float"
    sess, ops = _session(res.model, tmp_path, "w8a8")
    assert ops["QLinearConv"] == 64, ops
    assert not {"Conv", "FusedConv", "Clip"} & set(ops), ops  # every ReLU6 absorbed by the output codes
    top1, cos = _agreement(sess.run(None, {"x": photo_crops[1]})[0], ref)
    assert top1 >= MIN_TOP1 and cos >= MIN_COS, (top1, cos)


def test_equalization_exact_on_efficientnet_onnx(efficientnet_onnx, photo_crops):
    view = OnnxGraphView(load_model(efficientnet_onnx[0]))
    before = view.run(photo_crops[0][0])
    ctx = PassContext(WeightQuantConfig(), ActivationQuantConfig())
    result = run_pass(view, CrossLayerEqualization(EqualizeConfig()), photo_crops[0][:1], ctx, verify=True)
    applied = result.plan.applied_sites
    skipped = [n for n in result.plan.notes if not n.applied]
    # ReLU6 chains are skipped (clip bounds cannot scale per channel); Conv -> Conv chains equalize
    assert applied, [n.detail for n in result.plan.notes]
    assert any("clamps at 6" in n.detail for n in skipped)
    assert all(n.detail for n in skipped)
    assert max_relative_error(before, view.run(photo_crops[0][0])) <= 1e-4


def test_w8a8_cle_runs_and_is_no_worse(fp32, photo_crops, tmp_path):
    proto, ref = fp32
    plain = quantize_with_report(proto, "w8a8", photo_crops[0])
    cle = quantize_with_report(proto, "w8a8-cle", photo_crops[0])
    bc = {n.site: n for n in cle.report.results[-2].plan.notes}
    assert sum(n.applied for n in bc.values()) >= 64, "bias correction must reach every conv"
    (s_plain, _), (s_cle, _) = _session(plain.model, tmp_path, "p"), _session(cle.model, tmp_path, "c")
    _, cos_plain = _agreement(s_plain.run(None, {"x": photo_crops[1]})[0], ref)
    _, cos_cle = _agreement(s_cle.run(None, {"x": photo_crops[1]})[0], ref)
    assert cos_cle >= cos_plain - 0.005, (cos_cle, cos_plain)
