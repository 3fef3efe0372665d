"""LLM.int8 decomposition (`int8_decompose`): FP function unchanged on both graph kinds (synthetic
LLaMA/BERT/OPT-like graphs with injected outlier channels, and the real MiniLM), channel choice
and skip reasons, quantized torch and ONNX models that agree with each other and beat plain
per-token W8A8, the torch kernel wiring (CPU reference and Triton under the interpreter), saving,
and bad configs refused by recipe key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import Case
from models import TinyOpt, inject_stream_outliers, opt_inputs

import qpass
from qpass import zoo
from qpass.errors import ConfigError, PassError
from qpass.graph.edits import KeepFloatChannels
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.decompose import Int8Decompose, Int8DecomposeConfig, select_channels
from qpass.passes.smooth import SmoothQuant, SmoothQuantConfig
from qpass.qconfig import ActGranularity, ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import plan_quantization
from qpass.recipe import Recipe

A8_CFG = {"format": "int8", "granularity": ActGranularity.PER_TOKEN, "dynamic": True}
W8A8 = {
    "weights": {"format": "int8", "symmetric": True},
    "activations": {"format": "int8", "granularity": "per_token", "dynamic": True},
}


@pytest.fixture(scope="session")
def opt_case() -> Case:
    torch.manual_seed(0)
    model = inject_stream_outliers(TinyOpt(), factor=30.0)
    return Case("tiny_opt_stream", model, [opt_inputs(seed=i) for i in range(4)], ["ids"])


@pytest.fixture(params=["llama", "bert", "opt"])
def any_case(request, llama_case, bert_case, opt_case) -> Case:
    return {"llama": llama_case, "bert": bert_case, "opt": opt_case}[request.param]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def test_fp_function_unchanged(any_case, backend, onnx_dir):
    """The pass only annotates: verified identity, and every linear reading an outlier activation is chosen."""
    view = any_case.view(backend, onnx_dir)
    batches = any_case.batches_for(backend)
    before = view.run(batches[-1])
    result = run_pass(view, Int8Decompose(Int8DecomposeConfig()), batches, PassContext(), verify=True)
    assert result.plan.applied_sites and result.max_rel_error is not None
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    edits = [e for e in result.plan.edits if isinstance(e, KeepFloatChannels)]
    assert all(view.float_channels(e.op) is e.channels for e in edits)
    if any_case.name != "tiny_bert":  # injected channels 3 and 17 (norm gammas / stream) are chosen
        assert any({3, 17} <= set(e.channels.tolist()) for e in edits)
    for note in result.plan.notes:
        assert note.detail


def test_channel_selection_rules():
    absmax = torch.tensor([1.0, 7.0, 0.5, 60.0, 2.0, 6.0, 1.5, 0.2, 3.0, 1.0])
    ch, why = select_channels(absmax, Int8DecomposeConfig(max_fraction=0.5))
    assert ch.tolist() == [1, 3, 5] and "max|x| >= 6" in why
    ch, _ = select_channels(absmax, Int8DecomposeConfig(top_k=2, max_fraction=0.5))
    assert ch.tolist() == [1, 3]
    ch, _ = select_channels(absmax, Int8DecomposeConfig(ratio=10.0, max_fraction=0.5))  # median 1.0
    assert ch.tolist() == [3]
    ch, why = select_channels(absmax, Int8DecomposeConfig())  # 3 qualify, 10% of 10 channels = 1
    assert ch.tolist() == [3] and "capped" in why
    ch, _ = select_channels(absmax, Int8DecomposeConfig(threshold=100.0))
    assert ch.numel() == 0


def test_skip_reasons(backend, tmp_path):
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 8)
            with torch.no_grad():
                self.a.weight.mul_(0.01)  # the first layer's outputs (the second's inputs) stay small

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    x[..., 4] *= 50.0  # only the first linear's input has an outlier channel
    c = Case("two_linears", Two().eval(), [x, x * 0.5], ["x"])
    view = c.view(backend, tmp_path)
    res = run_pass(view, Int8Decompose(Int8DecomposeConfig()), c.batches_for(backend), PassContext())
    assert len(res.plan.applied_sites) == 1 and "[4]" in res.plan.applied_sites[0].detail
    assert len(res.plan.skipped_sites) == 1 and "no outlier channel" in res.plan.skipped_sites[0].detail


def test_fp_recipe_is_identity(llama_case):
    res = qpass.quantize_with_report(
        llama_case.model, {"passes": [{"int8_decompose": {}}]}, llama_case.batches[:-1]
    )
    x = llama_case.batches[-1]
    assert max_relative_error([llama_case.reference(x)], [res.model(x)]) <= 1e-4


@pytest.fixture(scope="module")
def quantized(llama_case, onnx_dir):
    """W8A8 per token with and without the decomposition, torch and ONNX, on the outlier TinyLlama."""
    calib = llama_case.batches[:-1]
    onnx_calib = {"x": np.concatenate([b.numpy() for b in calib])}
    path = str(llama_case.onnx_path(onnx_dir))
    out = {}
    for name in ("w8a8-dynamic", "w8a8-int8decomp"):
        out[name, "fx"] = qpass.quantize_with_report(llama_case.model, name, calib)
        out[name, "onnx"] = qpass.quantize_with_report(path, name, onnx_calib)
    return out


def _run(res, backend: str, x: torch.Tensor) -> torch.Tensor:
    if backend == "fx":
        with torch.no_grad():
            return res.model(x)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def test_decomposition_beats_plain_per_token(quantized, llama_case, backend):
    x = llama_case.batches[-1]
    ref = llama_case.reference(x)
    plain = _rel(_run(quantized["w8a8-dynamic", backend], backend, x), ref)
    decomp = _rel(_run(quantized["w8a8-int8decomp", backend], backend, x), ref)
    assert decomp < 0.4 * plain, (decomp, plain)
    notes = quantized["w8a8-int8decomp", backend].report.results[-1].plan.applied_sites
    assert notes and all("fp channels" in n.detail for n in notes)


def test_onnx_matches_torch_and_uses_integer_ops(quantized, llama_case):
    """Stock onnxruntime runs the lowered model; it computes what the torch lowering computes."""
    x = llama_case.batches[-1]
    y_fx = _run(quantized["w8a8-int8decomp", "fx"], "fx", x)
    y_onnx = _run(quantized["w8a8-int8decomp", "onnx"], "onnx", x)
    assert max_relative_error([y_fx], [y_onnx]) <= 1e-4
    ops = [n.op_type for n in quantized["w8a8-int8decomp", "onnx"].model.graph.node]
    plain_ops = [n.op_type for n in quantized["w8a8-dynamic", "onnx"].model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == plain_ops.count("MatMulIntegerToFloat") > 0
    # per activation read by linears: two Gathers (normal, outlier channels); per linear: MatMul + Add
    n_linear = ops.count("MatMulIntegerToFloat")
    assert ops.count("Gather") - plain_ops.count("Gather") <= 2 * n_linear
    assert ops.count("MatMul") - plain_ops.count("MatMul") == n_linear


def test_w4a8_reference_path_matches_onnx(llama_case, onnx_dir):
    """INT4 per-channel weights have no integer kernel on torch: the fake-quant reference of the same
    math runs, and equals the ONNX lowering (MatMulInteger takes the int4 codes as int8).
    """
    from qpass.lowering.torch_backend import LinearKernel
    from qpass.lowering.torch_decompose import DecomposedQuantLinear

    recipe = {"passes": [{"int8_decompose": {}}], **W8A8, "weights": {"format": "int4", "symmetric": True}}
    calib = llama_case.batches[:-1]
    fx = qpass.quantize_with_report(llama_case.model, recipe, calib)
    mods = [m for m in fx.model.modules() if isinstance(m, DecomposedQuantLinear)]
    assert mods and all(m.kernel is LinearKernel.REFERENCE for m in mods)
    onnx_calib = {"x": np.concatenate([b.numpy() for b in calib])}
    ox = qpass.quantize_with_report(str(llama_case.onnx_path(onnx_dir)), recipe, onnx_calib)
    x = llama_case.batches[-1]
    assert max_relative_error([_run(fx, "fx", x)], [_run(ox, "onnx", x)]) <= 1e-4


def test_torch_kernel_wiring(quantized, llama_case):
    """CPU: qpass::int8_decomp_gemm's torch._int_mm path equals the fake-quant reference; the Triton
    kernel (interpreted here) computes the same from the module's own operands.
    """
    from qpass.kernels._triton import interpreting
    from qpass.kernels.int8_decomp import int8_decomp_triton
    from qpass.lowering.torch_backend import LinearKernel
    from qpass.lowering.torch_decompose import DecomposedQuantLinear

    gm = quantized["w8a8-int8decomp", "fx"].model
    mods = [m for m in gm.modules() if isinstance(m, DecomposedQuantLinear)]
    assert mods and all(m.kernel is LinearKernel.W8A8_DECOMP for m in mods)
    m = mods[0]
    x = torch.randn(3, 5, m.weight_codes.shape[1])
    x[..., m.fp_channels] *= 40.0
    y = m(x)
    ref = m._forward_decomp_reference(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if interpreting():
        y_tr = int8_decomp_triton(*m.gemm_operands(x), torch.float32, blocks=(16, 16, 16))
        torch.testing.assert_close(y_tr.reshape(y.shape), y, rtol=1e-5, atol=1e-4)


def test_save_and_load(quantized, llama_case, tmp_path):
    from qpass.saved_model import load_quantized, save_quantized

    gm = quantized["w8a8-int8decomp", "fx"].model
    x = llama_case.batches[-1]
    save_quantized(gm, tmp_path / "m.pt2", x)
    loaded = load_quantized(tmp_path / "m.pt2")
    assert loaded.recipe.name == "w8a8-int8decomp"
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), gm(x), rtol=1e-5, atol=1e-5)


def test_recipe_and_bad_configs():
    r = qpass.get_recipe("w8a8-int8decomp")
    assert r.passes[-1].name == "int8_decompose" and r.passes[-1].config.threshold == 6.0
    assert Recipe.from_dict(r.to_dict()) == r
    step = [{"int8_decompose": {}}]
    cases = [
        ({"int8_decompose": {"threshold": 6.0, "top_k": 4}}, None, r"int8_decompose\.top_k"),
        ({"int8_decompose": {"threshold": -1.0}}, None, r"int8_decompose\.threshold"),
        ({"int8_decompose": {"ratio": 0.5}}, None, r"int8_decompose\.ratio"),
        ({"int8_decompose": {"max_fraction": 0.9}}, None, r"int8_decompose\.max_fraction"),
    ]
    for entry, _, key in cases:
        with pytest.raises(ConfigError, match=key):
            Recipe.from_dict({"passes": [entry], **W8A8})
    bad = [
        ({"activations": {"format": "int8"}}, r"'activations\.granularity'"),
        ({"activations": {"format": "int8", "dynamic": True}}, r"'activations\.granularity'"),
        ({"activations": None}, r"'activations'"),
        ({"activations": {**W8A8["activations"], "format": "fp8_e4m3"}}, r"'activations\.format'"),
        ({"weights": None}, r"'weights'"),
        ({"weights": {"format": "int4", "group": 32}}, r"'weights\.group'"),
        ({"weights": {"format": "int8", "symmetric": False}}, r"'weights\.symmetric'"),
        ({"weights": {"format": "int8", "lorc_rank": 4}}, r"'weights\.lorc_rank'"),
        ({"weights": {"format": "mxfp4"}}, r"'weights\.format'"),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=key):
            Recipe.from_dict({"passes": step, **W8A8, **override})
    with pytest.raises(ConfigError, match=r"passes\[0\].*must be the last pass"):
        Recipe.from_dict({"passes": [*step, {"smooth_quant": {}}], **W8A8})


def test_stale_choice_refused(llama_case):
    """Direct API use: a pass that edits after the channel choice (FP still exact) makes the
    choice stale; quantizing with it is refused.
    """
    view = llama_case.view("fx", Path("."))
    run_pass(view, Int8Decompose(Int8DecomposeConfig()), llama_case.batches, PassContext())
    res = run_pass(view, SmoothQuant(SmoothQuantConfig()), llama_case.batches, PassContext(), verify=True)
    assert res.plan.edits
    with pytest.raises(PassError, match="must be the last pass"):
        plan_quantization(view, None, WeightQuantConfig(), ActivationQuantConfig(**A8_CFG))


@pytest.mark.slow
def test_minilm_fp_unchanged_and_quantized_onnx(tmp_path):
    """Real MiniLM: the pass is exact on torch.fx and ONNX; the W8A8 decomposition runs in onnxruntime."""
    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=8, max_len=48)
    held_out = zoo.minilm_batches(tok, zoo.sentences("eval", 8), batch_size=8, max_len=48)
    tcalib = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calib]
    fp_recipe = {"passes": [{"int8_decompose": {}}]}
    res = qpass.quantize_with_report(embedder, fp_recipe, tcalib)
    chosen = res.report.results[0].plan.applied_sites
    assert chosen
    for b in held_out:
        tb = {k: torch.from_numpy(v) for k, v in b.items()}
        with torch.no_grad():
            assert max_relative_error([embedder(**tb)], [res.model(**tb)]) <= 1e-4
    path = zoo.export_minilm_onnx(tmp_path / "minilm.onnx", embedder=embedder)
    res_onnx = qpass.quantize_with_report(str(path), fp_recipe, calib)
    assert res_onnx.report.results[0].max_rel_error <= 1e-4
    assert len(res_onnx.report.results[0].plan.applied_sites) == len(chosen)
    q = qpass.quantize_with_report(str(path), "w8a8-int8decomp", calib)
    fp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(q.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in held_out:
        a, c = fp.run(None, b)[0], sess.run(None, b)[0]
        cos = (a * c).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(c, axis=-1)
        assert cos.min() > 0.98
