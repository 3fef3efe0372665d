"""SmoothQuant: the FP function is unchanged on both graph kinds; the plan, skips and search are right."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import qpass
from qpass.calibration import calibrate
from qpass.errors import ConfigError, PassError
from qpass.graph.edits import EditPlan, ScaleChannels
from qpass.pass_base import PassContext, QPass
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.smooth import SmoothQuant, SmoothQuantConfig, smoothing_scales
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig

PASSES_ONLY = {"weights": None, "activations": None}


def _run_both(case, backend, onnx_dir, model):
    """Outputs of the original torch model and of the transformed model, on a held-out batch."""
    held_out = case.batches[-1]
    ref = case.reference(held_out)
    if backend == "fx":
        out = model(*case.torch_args(held_out))
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, case.onnx_feed(held_out))[0])
    return ref, out


def _src(case, backend, onnx_dir):
    return case.model if backend == "fx" else case.onnx_path(onnx_dir)


def _calib(case, backend):
    return case.batches[:3] if backend == "fx" else {k: v[: 3 * 4] for k, v in case.onnx_calib().items()}


@pytest.mark.parametrize("alpha", [0.5, 0.85, "auto"])
def test_smoothing_preserves_function(case, backend, onnx_dir, alpha):
    recipe = {"passes": [{"smooth_quant": {"alpha": alpha}}], **PASSES_ONLY}
    res = qpass.quantize_with_report(
        _src(case, backend, onnx_dir), recipe, _calib(case, backend), verify=False
    )
    ref, out = _run_both(case, backend, onnx_dir, res.model)
    err = max_relative_error([ref], [out])
    assert err <= 1e-4, f"smoothing changed the function by {err:.2e}"
    assert res.report.results[0].plan.applied_sites, "no site was smoothed"


def test_sites_and_skip_reasons(llama_case, bert_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    plan = SmoothQuant(SmoothQuantConfig()).plan(view, _stats(view, llama_case, backend), PassContext())
    # per layer: qkv (norm), o_proj (through attention, GQA), gate/up (norm), down (up_proj branch); plus the head
    assert len(plan.applied_sites) == 9 and not plan.skipped_sites
    details = " ".join(n.detail for n in plan.applied_sites)
    assert "shared across heads of size 16" in details

    view = bert_case.view(backend, onnx_dir)
    plan = SmoothQuant(SmoothQuantConfig()).plan(view, _stats(view, bert_case, backend), PassContext())
    reasons = [n.detail for n in plan.skipped_sites]
    assert any("also feeds" in r for r in reasons)  # post-LN: residual reads the norm output
    assert any("gelu" in r.lower() and "not per-channel affine" in r for r in reasons)
    assert len(plan.applied_sites) == 3  # 2 attention outputs + the pre-LN block


def _stats(view, case, backend):
    sq = SmoothQuant(SmoothQuantConfig())
    return calibrate(view, case.batches_for(backend), sq.stat_requests(view, PassContext()), progress=False)


def test_smoothing_flattens_activation_outliers(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    batches = llama_case.batches_for(backend)
    sq = SmoothQuant(SmoothQuantConfig(alpha=0.5))
    requests = sq.stat_requests(view, PassContext())
    before = calibrate(view, batches, requests, progress=False)
    run_pass(view, sq, batches, PassContext())
    after = calibrate(view, batches, requests, progress=False)
    ratio = lambda st: float(st.absmax.max() / st.absmax.median())  # noqa: E731
    outlier_sites = [r.value for r in requests if ratio(before[r.value]) > 10]
    assert len(outlier_sites) >= 6
    for v in outlier_sites:
        assert ratio(after[v]) < ratio(before[v]) / 4


def test_scales_formula():
    a = torch.tensor([1.0, 100.0, 0.0])
    w = torch.tensor([1.0, 1.0, 2.0])
    s = smoothing_scales(a, w, 0.5, 1e-5)
    torch.testing.assert_close(s, torch.tensor([1.0, 10.0, 1.0], dtype=torch.float64))


def test_alpha_search_reduces_quantized_error(llama_case):
    """On a layer with outliers, the searched alpha beats no smoothing under W8A8 per tensor."""
    w8a8 = qpass.quantize(llama_case.model, "w8a8", llama_case.batches[:3])
    smooth = qpass.quantize(llama_case.model, "w8a8-smooth", llama_case.batches[:3])
    x = llama_case.batches[-1]
    ref = llama_case.reference(x)
    err = lambda m: float((m(x) - ref).norm() / ref.norm())  # noqa: E731
    assert err(smooth) < 0.7 * err(w8a8)


def test_config_validation():
    with pytest.raises(ConfigError, match="smooth_quant.alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match=r"passes\[0\].*unknown pass 'smooth'"):
        qpass.get_recipe({"passes": [{"smooth": {}}]})
    with pytest.raises(ConfigError, match="smooth_quant.alpha.*expected float \\| 'auto'"):
        qpass.get_recipe({"passes": [{"smooth_quant": {"alpha": "high"}}]})


class _BrokenSmooth(QPass):
    """Scales a consumer weight without compensating upstream: verification must catch it."""

    name = "broken_smooth"

    def plan(self, view, stats, ctx):
        sq = SmoothQuant(SmoothQuantConfig())
        site = sq.sites(view, ctx).found[0].site
        sink = site.sinks[0]
        factors = torch.full((site.channels,), 2.0)
        return EditPlan(
            self.name, [ScaleChannels(sink.weight.const, sink.weight.in_axis, factors, site=site.label)]
        )


def test_verification_rejects_a_broken_pass_and_restores(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    batches = llama_case.batches_for(backend)
    before = view.run(batches[0])
    with pytest.raises(PassError, match=r"broken_smooth.*changed the model's function.*at site '.+'"):
        run_pass(view, _BrokenSmooth(None), batches, PassContext(), verify=True)
    assert max_relative_error(before, view.run(batches[0])) == 0.0


def test_shared_weight_is_not_rescaled(backend, tmp_path):
    """A norm gamma that another op also reads cannot absorb a scale: the site is skipped."""

    class SharedGamma(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = torch.nn.Parameter(torch.rand(8) + 0.5)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x * self.g) + x * self.g

    from conftest import Case

    c = Case("shared", SharedGamma().eval(), [torch.randn(2, 3, 8)], ["x"])
    view = c.view(backend, tmp_path)
    stats = calibrate(
        view, c.batches_for(backend), SmoothQuant(SmoothQuantConfig()).stat_requests(view, PassContext())
    )
    plan = SmoothQuant(SmoothQuantConfig()).plan(view, stats, PassContext())
    assert not plan.edits
    assert any("shared by 2 ops" in n.detail or "also feeds" in n.detail for n in plan.skipped_sites)


def test_pass_context_formats_drive_search(llama_case):
    ctx = PassContext(WeightQuantConfig(), ActivationQuantConfig())
    view = llama_case.view("fx", None)
    sq = SmoothQuant(SmoothQuantConfig(alpha="auto"))
    stats = calibrate(view, llama_case.batches, sq.stat_requests(view, ctx), progress=False)
    plan = sq.plan(view, stats, ctx)
    assert all("searched" in n.detail for n in plan.applied_sites)
    alphas = {n.detail.split(",")[0] for n in plan.applied_sites}
    assert len(alphas) >= 1 and dataclasses.is_dataclass(sq.config)
    assert np.isfinite([float(a.split("=")[1].split(" ")[0]) for a in alphas]).all()
