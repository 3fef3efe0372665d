"""W8A8: weights INT8 per channel, linear inputs INT8 per tensor (static) or per token (dynamic);
QDQ on ONNX that stock onnxruntime runs, quantized modules on torch; both agree.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import qpass
from qpass.errors import UnsupportedOpError
from qpass.graph.view import iter_linear_ops
from qpass.lowering.torch_backend import QuantLinear
from qpass.qconfig import ActivationQuantConfig
from qpass.quant.qlinear import act_qparams


def _ort(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def test_onnx_qdq_structure(bert_case, onnx_dir):
    q = qpass.quantize(str(bert_case.onnx_path(onnx_dir)), "w8a8", bert_case.onnx_calib())
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    ops = collections.Counter(n.op_type for n in q.graph.node)
    linears = [
        n
        for n in q.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in producers
        and producers[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert len(linears) == 14
    for mm in linears:
        wdq = producers[mm.input[1]]
        codes, scale = inits[wdq.input[0]], inits[wdq.input[1]]
        assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
        assert scale.shape == (codes.shape[1],)  # one scale per output channel of [in, out]
        assert next(a.i for a in wdq.attribute if a.name == "axis") == 1
        adq = producers[mm.input[0]]
        assert adq.op_type == "DequantizeLinear" and producers[adq.input[0]].op_type == "QuantizeLinear"
    # q, k and v read one activation: one shared Q/DQ pair, not three
    assert ops["QuantizeLinear"] == len({producers[mm.input[0]].input[0] for mm in linears}) == 10
    # no float copy of a quantized weight is left behind
    assert not any(
        name.endswith(".weight") and arr.dtype == np.float32 and arr.ndim == 2
        for name, arr in inits.items()
        if any(name == mm.input[1] for mm in linears)
    )


def test_weight_codes_and_activation_params(llama_case):
    q = qpass.quantize(llama_case.model, "w8a8", llama_case.batches)
    mods = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(mods) == 15
    lin = llama_case.model.layers[0].self_attn.q_proj.weight.detach()
    m = next(
        m
        for m in mods
        if m.weight_codes.shape == lin.shape and torch.allclose(m._weight, lin, atol=lin.abs().max() / 200)
    )
    torch.testing.assert_close(m.weight_scales, lin.abs().amax(1, keepdim=True) / 127)
    torch.testing.assert_close(m.weight_codes.float(), torch.round(lin / m.weight_scales))
    assert m.act_qparams.qmin == 0 and m.act_qparams.qmax == 255


def test_grouped_int4_weights_and_int4_activations(llama_case):
    recipe = {
        "weights": {"format": "int4", "group": 32, "symmetric": False},
        "activations": {"format": "int4", "granularity": "per_token", "dynamic": True},
    }
    q = qpass.quantize(llama_case.model, recipe, llama_case.batches)
    m = next(m for m in q.modules() if isinstance(m, QuantLinear) and m._weight.shape == (64, 64))
    assert m.weight_scales.shape == (64, 2) and m.weight_zero_points.shape == (64, 2)
    assert int(m.weight_codes.min()) >= 0 and int(m.weight_codes.max()) <= 15
    # dequantization is (code - zero) * scale per group of 32 input channels
    g0 = (m.weight_codes[:, :32].float() - m.weight_zero_points[:, :1].float()) * m.weight_scales[:, :1]
    torch.testing.assert_close(m._weight[:, :32], g0)
    x = llama_case.batches[-1]
    w8 = qpass.quantize(llama_case.model, "w8a8-dynamic", llama_case.batches)
    ref = llama_case.reference(x)
    assert _rel(w8(x).detach(), ref) < _rel(q(x).detach(), ref) < 1.0


def test_formats_onnx_cannot_lower_are_clear_errors(llama_case, onnx_dir):
    with pytest.raises(UnsupportedOpError, match="MatMulNBits.*'weights.group': 8 "):
        qpass.quantize(
            str(llama_case.onnx_path(onnx_dir)),
            {"weights": {"format": "int4", "group": 8}},
            llama_case.onnx_calib(),
        )


def test_act_qparams_cover_the_range():
    qp = act_qparams(-1.0, 3.0, ActivationQuantConfig())
    assert qp.scale == pytest.approx(4.0 / 255) and qp.zero_point == round(1.0 / qp.scale)
    sym = act_qparams(-1.0, 3.0, ActivationQuantConfig(symmetric=True))
    assert sym.zero_point == 0 and sym.scale == pytest.approx(3.0 / 127)
    pos = act_qparams(0.5, 2.0, ActivationQuantConfig())  # zero stays representable
    assert pos.zero_point == 0 and pos.scale == pytest.approx(2.0 / 255)


def test_onnx_and_torch_paths_agree(llama_case, onnx_dir):
    calib = llama_case.onnx_calib()
    qo = qpass.quantize(str(llama_case.onnx_path(onnx_dir)), "w8a8-smooth", calib)
    qt = qpass.quantize(llama_case.model, "w8a8-smooth", llama_case.batches)
    x = llama_case.batches[-1]
    y_onnx = _ort(qo).run(None, {"x": x.numpy()})[0]
    y_torch = qt(x).detach()
    ref = llama_case.reference(x)
    # same recipe, same calibration, same math: the two lowerings agree far below the quantization error
    assert _rel(y_onnx, ref) < 0.25 and _rel(y_torch, ref) < 0.25
    assert _rel(y_onnx, y_torch) < 0.01 * _rel(y_torch, ref)


def test_dynamic_per_token_on_torch(llama_case):
    q = qpass.quantize(llama_case.model, "w8a8-dynamic", llama_case.batches)
    x = llama_case.batches[-1]
    assert _rel(q(x).detach(), llama_case.reference(x)) < 0.25
    # per-token scales: the same row quantizes the same way whatever batch it comes in
    torch.testing.assert_close(q(x[:1]), q(x)[:1])


def test_dynamic_per_token_onnx_matches_torch(llama_case, onnx_dir):
    qo = qpass.quantize(str(llama_case.onnx_path(onnx_dir)), "w8a8-dynamic", llama_case.onnx_calib())
    qt = qpass.quantize(llama_case.model, "w8a8-dynamic", llama_case.batches)
    assert any(n.op_type == "MatMulIntegerToFloat" for n in qo.graph.node)
    x = llama_case.batches[-1]
    y_torch = qt(x).detach()
    y_onnx = _ort(qo).run(None, {"x": x.numpy()})[0]
    assert _rel(y_onnx, y_torch) < 0.01 * _rel(y_torch, llama_case.reference(x))


def test_passes_only_recipe_keeps_float_model(bert_case, onnx_dir):
    q = qpass.quantize(
        str(bert_case.onnx_path(onnx_dir)),
        {"passes": [{"smooth_quant": {"alpha": 0.5}}], "weights": None, "activations": None},
        bert_case.onnx_calib(),
    )
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in q.graph.node}


def test_input_model_objects_are_not_modified(llama_case, onnx_dir):
    proto = onnx.load(str(llama_case.onnx_path(onnx_dir)))
    before = proto.SerializeToString()
    qpass.quantize(proto, "w8a8-smooth", llama_case.onnx_calib())
    assert proto.SerializeToString() == before
    state = {k: v.clone() for k, v in llama_case.model.state_dict().items()}
    qpass.quantize(llama_case.model, "w8a8-smooth", llama_case.batches)
    for k, v in llama_case.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_gptq_in_the_pipeline_beats_rtn(llama_case):
    """Same format and calibration: every layer's output error on calibration data, tr(E H E^T) /
    tr(W H W^T), is lower with GPTQ than with RTN (ONNX Runtime's GPTQ option ships RTN weights).
    """
    from qpass.calibration import calibrate
    from qpass.qconfig import WeightQuantConfig
    from qpass.quant.lorc import layer_error
    from qpass.quant.qlinear import canonical_weight, quant_stat_requests

    view = llama_case.view("fx", None)
    requests = quant_stat_requests(view, None, WeightQuantConfig(algo="gptq"))
    stats = calibrate(view, llama_case.batches, requests, progress=False)
    models = {
        algo: qpass.quantize(
            llama_case.model, {"weights": {"format": "int3", "group": 32, "algo": algo}}, llama_case.batches
        )
        for algo in ("rtn", "gptq")
    }
    ops = list(iter_linear_ops(view))
    assert len(ops) == 15
    for op in ops:
        ref = view.weight(op)
        w = canonical_weight(view.read(ref.const), ref)
        h = stats[view.linear_input(op)].xtx
        err = {a: layer_error(w, getattr(m, "qlinear_" + op.name)._weight, h) for a, m in models.items()}
        assert err["gptq"] < 0.9 * err["rtn"], (op.name, err)
    # act-order with dynamic groups: layers keep their g_idx and dequantize by it
    assert any(m.weight_g_idx is not None for m in models["gptq"].modules() if isinstance(m, QuantLinear))


def test_output_clip_in_the_pipeline_beats_rtn(llama_case):
    """`clip_objective: output` collects X^T X for RTN and lowers the summed layer error; with one
    scale per row no layer gets worse (ratio 1 is in the grid).
    """
    from qpass.calibration import calibrate
    from qpass.qconfig import WeightQuantConfig
    from qpass.quant.lorc import layer_error
    from qpass.quant.qlinear import canonical_weight, quant_stat_requests

    view = llama_case.view("fx", None)
    cfg = WeightQuantConfig(format="int3", clip_search=True, clip_objective="output")
    assert cfg.needs_hessian
    stats = calibrate(view, llama_case.batches, quant_stat_requests(view, None, cfg), progress=False)
    models = {
        name: qpass.quantize(llama_case.model, {"weights": w}, llama_case.batches)
        for name, w in {
            "rtn": {"format": "int3"},
            "output": {"format": "int3", "clip_search": True, "clip_objective": "output"},
        }.items()
    }
    total = dict.fromkeys(models, 0.0)
    for op in iter_linear_ops(view):
        ref = view.weight(op)
        w = canonical_weight(view.read(ref.const), ref)
        h = stats[view.linear_input(op)].xtx
        err = {k: layer_error(w, getattr(m, "qlinear_" + op.name)._weight, h) for k, m in models.items()}
        assert err["output"] <= err["rtn"] * (1 + 1e-6), (op.name, err)
        for k in total:
            total[k] += err[k]
    assert total["output"] < 0.9 * total["rtn"], total


def test_gptq_int8_per_channel_lowers_to_onnx(llama_case, onnx_dir):
    """GPTQ weights go through the same QDQ lowering: ONNX and torch agree far below the error."""
    recipe = {"weights": {"format": "int8", "algo": "gptq"}, "activations": {}}
    qo = qpass.quantize(str(llama_case.onnx_path(onnx_dir)), recipe, llama_case.onnx_calib())
    qt = qpass.quantize(llama_case.model, recipe, llama_case.batches)
    x = llama_case.batches[-1]
    y_onnx, y_torch = _ort(qo).run(None, {"x": x.numpy()})[0], qt(x).detach()
    err = _rel(y_torch, llama_case.reference(x))
    assert err < 0.6
    assert _rel(y_onnx, y_torch) < 0.01 * err
