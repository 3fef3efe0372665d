"""Weight quantizers wired end to end: AWQ search, LoRC, kept (protected) weights, mixed precision.

Each feature runs through `quantize_with_report` (torch.export capture, real calibration,
the torch lowering) on the small outlier LLaMA, and its lowered modules are checked against
the planned math (`QLinear.effective_weight`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from models import TinyLlama, inject_outliers, llama_inputs

from qpass.api import quantize_with_report
from qpass.calibration import StatKind, StatRequest, calibrate
from qpass.config import from_mapping
from qpass.errors import ConfigError
from qpass.graph.fx import FxGraphView
from qpass.graph.fx_capture import capture, clone_graph_module
from qpass.graph.refs import OpKind
from qpass.graph.view import iter_linear_ops
from qpass.lowering.torch_corrections import CorrectedQuantLinear
from qpass.qconfig import WeightQuantConfig
from qpass.quant.allocation import storage_bits
from qpass.quant.gptq import gptq
from qpass.quant.lorc import layer_error
from qpass.quant.qlinear import ReplaceWithQOp, canonical_weight, plan_quantization, weight_spec
from qpass.quant.rtn import rtn
from qpass.quant.weight_quant import quantize_weight
from qpass.recipe import get_recipe
from qpass.threads import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: OpenMP hand-offs cost more than the math on a shared 2-core machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = inject_outliers(TinyLlama())
    calib = [llama_inputs(4, 16, seed=s) for s in range(4)]
    held_out = llama_inputs(8, 16, seed=99)
    with torch.no_grad():
        ref = model(held_out)
    return model, calib, held_out, ref


def _recipe(**weights) -> dict:
    return {"passes": [], "weights": weights, "activations": None, "target": "torch"}


def _held_out_error(result, held_out, ref) -> float:
    with torch.no_grad():
        y = result.model(held_out)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return float(((y - ref) ** 2).sum() / (ref**2).sum())


def _planned(model, calib, wcfg: WeightQuantConfig):
    """Plan quantization on a captured graph; return the view, the plan and its QLinears by op name."""
    view = FxGraphView(clone_graph_module(capture(model, calib[0])))
    inputs = dict.fromkeys(view.linear_input(op) for op in iter_linear_ops(view) if op.kind is OpKind.LINEAR)
    stats = calibrate(
        view, calib, [StatRequest(v, frozenset({StatKind.XTX})) for v in inputs], progress=False
    )
    plan = plan_quantization(view, stats, wcfg, None, calib)
    qs = {e.op.name: e.qlinear for e in plan.edits if isinstance(e, ReplaceWithQOp)}
    return view, plan, qs, stats


def _modules(gm) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in gm.named_modules() if n.startswith("qlinear_")}


# ------------------------------------------------------------------------------ AWQ


def test_awq_search_lowers_output_error_vs_rtn(llama):
    model, calib, held_out, ref = llama
    plain = quantize_with_report(model, _recipe(format="int4", group=32, algo="rtn"), calib)
    awq = quantize_with_report(model, _recipe(format="int4", group=32, algo="awq"), calib)
    e_plain, e_awq = _held_out_error(plain, held_out, ref), _held_out_error(awq, held_out, ref)
    assert e_awq < 0.8 * e_plain, (e_awq, e_plain)
    awq_result = next(r for r in awq.report.results if r.name == "awq")
    assert awq_result.max_rel_error is not None and awq_result.max_rel_error < 1e-4  # the scaling is exact
    applied = awq_result.plan.applied_sites
    assert applied and all("alpha=" in n.detail for n in applied)


def test_awq_without_integer_weights_is_refused(llama):
    model, calib, _, _ = llama
    recipe = {"passes": [{"awq": {}}], "weights": None, "activations": None, "target": "torch"}
    with pytest.raises(ConfigError, match="pass 'awq' needs an integer weight format"):
        quantize_with_report(model, recipe, calib)


# ------------------------------------------------------------------------------ LoRC


def test_lorc_lowers_error_and_module_matches_math(llama):
    model, calib, held_out, ref = llama
    lorc = quantize_with_report(model, _recipe(format="int3", group=32, algo="gptq", lorc_rank=4), calib)
    assert _held_out_error(lorc, held_out, ref) < 0.1  # int3 GPTQ alone: ~0.2 on this model
    mods = _modules(lorc.model)
    assert mods and all(isinstance(m, CorrectedQuantLinear) and m.lorc_u.shape[1] == 4 for m in mods.values())

    wcfg = WeightQuantConfig(format="int3", group=32, algo="gptq", lorc_rank=4)
    view, _, qs, stats = _planned(model, calib, wcfg)
    ops = {op.name: op for op in iter_linear_ops(view)}
    for name, q in qs.items():  # every layer: the correction lowers its output error on calibration data
        w = canonical_weight(view.read(q.weight.const), q.weight)
        h = stats[view.linear_input(ops[name])].xtx
        assert layer_error(w, q.effective_weight(), h) < 0.9 * layer_error(w, q.dequantized_weight(), h), name
    module = CorrectedQuantLinear(q, None, None)
    x = torch.randn(3, 5, w.shape[1])
    expected = F.linear(x, q.dequantized_weight()) + (x @ q.lorc_v.T) @ q.lorc_u.T
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x), F.linear(x, q.effective_weight()), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ protection


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_protected_weights_are_kept_exactly(llama, algo):
    model, calib, _, _ = llama
    wcfg = WeightQuantConfig(format="int3", group=32, algo=algo, protect=0.01)
    view, _, qs, stats = _planned(model, calib, wcfg)
    ops = {op.name: op for op in iter_linear_ops(view)}
    for name, q in qs.items():
        w = canonical_weight(view.read(q.weight.const), q.weight)
        rows, cols = q.outlier_rows, q.outlier_cols
        assert q.outlier_values.numel() == max(1, round(0.01 * w.numel()))
        eff = q.effective_weight()
        # their codes are the zero code, and the effective weight holds the kept float value
        assert torch.all(q.dequantized_weight()[rows, cols] == 0)
        assert torch.equal(eff[rows, cols], q.outlier_values)
        if algo == "rtn":
            assert torch.equal(eff[rows, cols], w[rows, cols])  # RTN keeps the original weights
        h = stats[view.linear_input(ops[name])].xtx
        plain = rtn(w, weight_spec(wcfg)) if algo == "rtn" else gptq(w, h, weight_spec(wcfg))
        assert layer_error(w, eff, h) < layer_error(w, plain.dequantized(), h), name
        module = CorrectedQuantLinear(q, None, None)
        x = torch.randn(2, 7, w.shape[1])
        torch.testing.assert_close(module(x), F.linear(x, eff), rtol=1e-4, atol=1e-5)


def test_super_weight_is_chosen_and_kept():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    w[3, 9] = 2.0  # one super weight on a busy input channel
    x = torch.randn(512, 64)
    x[:, 9] *= 10
    cfg = WeightQuantConfig(format="int4", group=32, algo="rtn", protect=1, protect_criterion="magnitude")
    lw = quantize_weight(w, cfg, weight_spec(cfg), x.T @ x)
    assert (int(lw.outlier_rows[0]), int(lw.outlier_cols[0])) == (3, 9)
    assert float(lw.effective()[3, 9]) == 2.0


# ------------------------------------------------------------------------------ mixed precision


def _mixed_recipe(budget: float) -> dict:
    return _recipe(
        format="int4",
        group=32,
        algo="gptq",
        mixed={"budget_bits": budget, "candidates": [{"format": "int2", "group": 32}, {"format": "int8"}]},
    )


def test_mixed_precision_recipe_within_budget_end_to_end(llama):
    model, calib, held_out, ref = llama
    budget = 4.5
    result = quantize_with_report(model, _mixed_recipe(budget), calib)
    plan = next(r for r in result.report.results if r.name == "quantize").plan
    qs = [e.qlinear for e in plan.edits if isinstance(e, ReplaceWithQOp)]
    total = sum(storage_bits(q.spec, tuple(q.codes.shape), scale_bits=16) for q in qs)
    n = sum(q.codes.numel() for q in qs)
    assert total <= budget * n
    chosen = {(q.bits, q.group_size) for q in qs}
    assert len(chosen) >= 2, chosen  # a real mix, not one format
    notes = [s for s in plan.notes if s.detail.startswith("mixed")]
    assert len(notes) == len(qs) + 1 and "budget 4.5" in notes[-1].detail
    mixed_err = _held_out_error(result, held_out, ref)
    uniform = quantize_with_report(model, _recipe(format="int4", group=32, algo="gptq"), calib)
    assert mixed_err < _held_out_error(uniform, held_out, ref)  # int4/g32 alone costs 4.5 bits too
    assert torch.isfinite(result.model(held_out)).all()


def test_mixed_precision_infeasible_budget_names_key():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    with pytest.raises(ConfigError, match=r"weights.mixed.budget_bits.*cheapest allocation \(2.5"):
        quantize_with_report(model, _mixed_recipe(2.0), [torch.randn(4, 64)])


# ------------------------------------------------------------------------------ recipes and config


@pytest.mark.parametrize("name", ["w4a16-gptq", "w3a16-gptq-lorc", "mixed-4.5bit", "w4a16-awq"])
def test_builtin_weight_recipes_load(name):
    r = get_recipe(name)
    assert r.weights is not None and r.activations is None
    assert r.target in ("torch", "onnxruntime")  # w4a16-gptq lowers to MatMulNBits


@pytest.mark.parametrize(
    ("weights", "key"),
    [
        ({"lorc_rank": -1}, "weights.lorc_rank"),
        ({"protect": 1.5}, "weights.protect"),
        ({"protect": -2}, "weights.protect"),
        ({"protect": "many"}, "weights.protect"),
        ({"format": "mxfp4", "lorc_rank": 2}, "weights.lorc_rank"),
        ({"algo": "awk"}, "weights.algo"),
        ({"mixed": {"budget_bits": 0}}, "weights.mixed.budget_bits"),
        ({"mixed": {"candidates": [{"format": "fp8_e4m3"}]}}, "weights.mixed.candidates[0].format"),
        ({"mixed": {"candidates": [{"format": "int8", "groop": 2}]}}, "weights.mixed.candidates[0].groop"),
        ({"mixed": {"budget_bits": 4.5}, "lorc_rank": 2}, "weights.lorc_rank"),
    ],
)
def test_weight_config_errors_name_the_key(weights, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_mapping(WeightQuantConfig, {"format": "int4", "group": 32, **weights}, "weights")


@pytest.mark.parametrize("acts", [None, {"format": "int8", "granularity": "per_token", "dynamic": True}])
def test_lorc_and_kept_weights_lower_to_onnx_and_match_torch(tmp_path, acts):
    """LoRC (two small MatMuls) and kept weights (Gather + MatMul) run in stock onnxruntime and give
    the torch-side corrected model's outputs; without them the ONNX model is further from FP.
    """
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    x = torch.randn(16, 64)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=True)
    recipe = {**_recipe(format="int3", group=32, lorc_rank=4, protect=24), "activations": acts}
    plain = {**_recipe(format="int3", group=32), "activations": acts}
    outs = {}
    for key, r in (("corrected", recipe), ("plain", plain)):
        q = quantize_with_report(str(path), r, {"x": x.numpy()}, batch_size=16).model
        sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[key] = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        ops = {n.op_type for n in q.graph.node}
        assert ("Gather" in ops) == (key == "corrected"), ops
    qt = quantize_with_report(model, {**recipe, "target": "torch"}, [x]).model
    assert any(isinstance(m, CorrectedQuantLinear) for m in qt.modules())
    with torch.no_grad():
        ref, fp = qt(x), model(x)
    torch.testing.assert_close(outs["corrected"], ref, rtol=1e-4, atol=1e-4)
    assert (outs["corrected"] - fp).norm() < 0.8 * (outs["plain"] - fp).norm()


def test_gptq_keep_mask_shape_checked():
    w = torch.randn(8, 32)
    with pytest.raises(ConfigError, match="argument 'keep'"):
        gptq(
            w,
            torch.eye(32),
            weight_spec(WeightQuantConfig(format="int4", group=32)),
            keep=torch.zeros(8, 16, dtype=torch.bool),
        )
    cfg = dataclasses.replace(WeightQuantConfig(format="int4", group=32), protect=3)
    with pytest.raises(Exception, match="X\\^T X"):
        quantize_weight(w, cfg, weight_spec(cfg), None, layer="fc")
