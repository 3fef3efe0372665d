"""Channel reordering: exact on both graph kinds with no added op, skips explained, and block
quantization error of the reordered linear inputs / K cache lower on outlier models.
"""

from __future__ import annotations

import pytest
import torch
from models import TinyLlama, spread_channel_outliers

import qpass
from qpass.calibration import StatKind
from qpass.errors import ConfigError, PassError
from qpass.formats import fake_quantize, get_format, mse
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.reorder import (
    Reorder,
    ReorderConfig,
    ReorderKey,
    ReorderMethod,
    balance_permutation,
    channel_key,
    sort_permutation,
    tile_permutation,
)


def _run(view, batches, **cfg):
    return run_pass(view, Reorder(ReorderConfig(**cfg)), batches, PassContext(), verify=True)


@pytest.mark.parametrize(
    "cfg",
    [
        {"block": 8},
        {"block": 8, "method": "balance", "outlier_ratio": 1.3},
        {"block": 8, "key": "weight"},
        {"block": 8, "key": "activation"},
    ],
)
def test_reorder_preserves_function_and_op_count(case, backend, onnx_dir, cfg):
    view = case.view(backend, onnx_dir)
    batches = case.batches_for(backend)
    n_ops = [op.op_type for op in view.ops()]
    before = view.run(batches[-1])
    cfg = {
        k: (ReorderMethod(v) if k == "method" else ReorderKey(v) if k == "key" else v) for k, v in cfg.items()
    }
    result = _run(view, batches, **cfg)
    notes = result.plan.applied_sites
    ordered = [n for n in result.plan.skipped_sites if "already in the chosen order" in n.detail]
    assert notes
    # down_proj / fc2 inputs (through the elementwise MLP), o_proj (per head), K caches
    assert sum("linear input" in n.detail for n in notes) + len(ordered) >= 3
    assert sum("K cache" in n.detail for n in notes) + len(ordered) >= 2
    assert [op.op_type for op in view.ops()] == n_ops  # no runtime op: only constants changed
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4


def test_skip_reasons(llama_case, bert_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    plan = Reorder(ReorderConfig(block=32)).plan(view, _stats(view, llama_case, backend), PassContext())
    reasons = " | ".join(n.detail for n in plan.skipped_sites)
    assert "heads of size 16 fit in one block of 32" in reasons  # V -> o_proj and Q/K
    assert "64 channels fit in one block" not in reasons
    applied = [n.site for n in plan.applied_sites]
    assert len(applied) == 2  # the two down_proj inputs (160 channels)
    view = bert_case.view(backend, onnx_dir)
    plan = Reorder(ReorderConfig(block=8)).plan(view, _stats(view, bert_case, backend), PassContext())
    reasons = " | ".join(n.detail for n in plan.skipped_sites)
    assert "residual stream" in reasons  # pre-LN norm output
    assert "also feeds" in reasons  # post-LN output read by the residual add


def _stats(view, case, backend):
    from qpass.calibration import calibrate

    requests = Reorder(ReorderConfig(block=8)).stat_requests(view, PassContext())
    return calibrate(view, case.batches_for(backend), requests, progress=False)


class _Rope(torch.nn.Module):
    """Q/K with rotate_half RoPE between the projections and Q K^T: Q/K reordering must skip."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, 64, bias=False) for _ in range(4))
        self.register_buffer("cos", torch.rand(64, 64))
        self.register_buffer("sin", torch.rand(64, 64))

    def forward(self, x):
        n = x.shape[1]

        def rope(t):
            half = torch.cat([-t[..., 32:], t[..., :32]], -1)
            return t * self.cos[:n] + half * self.sin[:n]

        q, k = rope(self.q(x)), rope(self.k(x))
        return self.o((q @ k.transpose(-1, -2)).softmax(-1) @ self.v(x))


def test_rope_is_skipped_with_reason(backend, tmp_path):
    from conftest import Case

    c = Case("rope", _Rope().eval(), [torch.randn(2, 12, 64)], ["x"])
    view = c.view(backend, tmp_path)
    result = _run(view, c.batches_for(backend), block=8)
    skipped = [n for n in result.plan.skipped_sites if n.site.startswith("Q K^T")]
    assert skipped and all("RoPE" in n.detail for n in skipped)
    assert not any("K cache" in n.detail for n in result.plan.applied_sites)


def test_permutations():
    key = torch.tensor([1.0, 50.0, 1.0, 1.0, 2.0, 1.0, 60.0, 1.0])
    perm = sort_permutation(key)
    assert perm[:2].tolist() == [6, 1]
    # the outliers' block of 4 is filled with the smallest channels, not the next largest (4)
    filled = sort_permutation(key, block=4, ratio=4.0)
    assert filled[:2].tolist() == [6, 1] and 4 not in filled[:4].tolist()
    assert sorted(filled.tolist()) == list(range(8))
    bal = balance_permutation(key, block=4, ratio=4.0)
    assert sorted(bal.tolist()) == list(range(8))
    assert {int(bal[i]) for i in range(4)} >= {1, 6} or {int(bal[i]) for i in range(4, 8)} >= {1, 6}
    assert int((bal != torch.arange(8)).sum()) == 2  # one swap
    torch.testing.assert_close(tile_permutation(torch.tensor([1, 0]), 6), torch.tensor([1, 0, 3, 2, 5, 4]))


def _spiky_channels() -> torch.Tensor:
    """32 channels of RMS 1 and 32 of RMS 0.1, each small one with one spike equal to a big
    channel's absmax, columns shuffled: absmax interleaves the two kinds, RMS separates them.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, 32:] *= 0.1
    x[torch.arange(32) * 8, torch.arange(32, 64)] = x[:, :32].abs().amax(0)
    return x[:, torch.randperm(64, generator=gen)]


def test_rms_key_groups_channels_by_typical_size():
    """The block-MSE gain of the RMS key over absmax (benchmarks/reorder_split.py: MiniLM's FFN
    inputs, heavy-tailed), reproduced on channels whose absmax hides their size.
    """
    from qpass.calibration import ChannelStats

    x = _spiky_channels()
    stats = ChannelStats(
        x.abs().amax(0), x.amin(0), x.amax(0), count=x.shape[0], sumsq=x.double().square().sum(0)
    )
    spec = get_format("mxfp4", group_size=8)
    small = x.square().mean(0) < 0.1
    errs = {}  # block-quantization MSE of the small channels (the big ones' changes little), all
    for kind in (ReorderKey.RMS, ReorderKey.ACTIVATION, None):
        perm = sort_permutation(channel_key(kind, stats), block=8, ratio=4.0) if kind else torch.arange(64)
        assert sorted(perm.tolist()) == list(range(64))
        err = torch.empty(64)
        err[perm] = (fake_quantize(x[:, perm], spec) - x[:, perm]).square().mean(0)
        errs[kind] = (float(err[small].mean()), float(err.mean()))
    assert errs[ReorderKey.RMS][0] < 0.5 * errs[ReorderKey.ACTIVATION][0], errs
    assert errs[ReorderKey.RMS][1] < errs[None][1], errs
    with pytest.raises(PassError, match="moments"):
        channel_key(ReorderKey.RMS, ChannelStats(x.abs().amax(0), x.amin(0), x.amax(0), count=256))


def test_rms_key_requests_moments(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    for key, want in ((ReorderKey.RMS, True), (ReorderKey.ACTIVATION, False)):
        requests = Reorder(ReorderConfig(block=8, key=key)).stat_requests(view, PassContext())
        assert requests and all((StatKind.MOMENTS in r.kinds) == want for r in requests)
    assert Reorder(ReorderConfig(block=8, key=ReorderKey.WEIGHT)).stat_requests(view, PassContext()) == []


def test_config_validation():
    with pytest.raises(ConfigError, match=r"reorder\.block"):
        ReorderConfig(block=1)
    with pytest.raises(ConfigError, match="nothing to reorder"):
        ReorderConfig(linear_inputs=False, k_cache=False)
    with pytest.raises(ConfigError, match=r"reorder\.method"):
        qpass.get_recipe({"passes": [{"reorder": {"method": "shuffle"}}]})
    recipe = qpass.get_recipe("mxfp4-reorder")
    assert recipe.passes[0].name == "reorder" and recipe.weights.format == "mxfp4"


@pytest.fixture(scope="module")
def wide_llama():
    """Head size 64 and MLP width 256, so MXFP4 blocks of 32 can be reordered; outliers spread."""
    torch.manual_seed(0)
    model = spread_channel_outliers(TinyLlama(dim=128, hidden=256, heads=2, kv_heads=1), factor=16.0, count=4)
    return model, [torch.randn(4, 16, 128, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("key", [ReorderKey.RMS, ReorderKey.ACTIVATION])
@pytest.mark.parametrize(("fmt", "gain"), [("mxfp4", 1.15), ("bfp12", 1.1), ("mxint8", 1.2)])
def test_reordering_lowers_block_error(wide_llama, fmt, gain, key):
    """Block-quantization MSE of every reordered value (linear inputs, K) drops; the whole
    benchmark with measured ratios is benchmarks/reorder_split.py.
    """
    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture, clone_graph_module

    model, batches = wide_llama
    block = get_format(fmt).group_size
    view = FxGraphView(clone_graph_module(capture(model, batches[0])))
    pss = Reorder(ReorderConfig(block=block, key=key))
    sites = pss.sites(view, PassContext()).found
    values = [s.value for s in sites]
    assert len(values) == 6
    before = view.observe(values, batches[-1])
    run_pass(view, pss, batches, PassContext())
    after = view.observe(values, batches[-1])
    spec = get_format(fmt)
    ratios = []
    for v in values:
        errs = [float(mse(t[v.name], fake_quantize(t[v.name], spec))) for t in (before, after)]
        ratios.append(errs[0] / errs[1])
    geo = float(torch.tensor(ratios).log().mean().exp())
    assert geo >= gain, f"{fmt}: MSE ratios {ratios}"


def test_mxfp4_reorder_recipe_runs(wide_llama):
    model, batches = wide_llama
    x = batches[-1]
    with torch.no_grad():
        ref = model(x)
    q = qpass.quantize(model, "mxfp4-reorder", batches[:2])
    err = float((q(x) - ref).norm() / ref.norm())
    assert err < 0.5


@pytest.mark.slow
def test_reorder_is_exact_on_minilm_fx_and_onnx(tmp_path):
    """Real MiniLM: the FFN inputs (GELU of the 1536-wide intermediate) reordered for MXFP4
    blocks, and every head site for BFP blocks of 8; FP outputs unchanged, no op added.
    """
    from qpass import zoo
    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture, clone_graph_module
    from qpass.graph.onnx import OnnxGraphView
    from qpass.graph.onnx_load import load_model

    embedder, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=8, max_len=32)
    torch_batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    path = zoo.export_minilm_onnx(tmp_path / "minilm.onnx", embedder=embedder)
    for make, bs in (
        (lambda: FxGraphView(clone_graph_module(capture(embedder, torch_batches[0]))), torch_batches),
        (lambda: OnnxGraphView(load_model(path)), batches),
    ):
        for block in (32, 8):
            view = make()
            n_ops = len(list(view.ops()))
            before = view.run(bs[-1])
            result = _run(view, bs, block=block)
            if block == 32:
                assert len(result.plan.applied_sites) == 6  # the six FFN down-projection inputs
            else:  # heads of 32: one permutation per head (12 heads) at the attention outputs
                assert any("(12 permutations)" in n.detail for n in result.plan.applied_sites)
            assert len(list(view.ops())) == n_ops
            assert max_relative_error(before, view.run(bs[-1])) <= 1e-4


def _normal_channel_mse(t: torch.Tensor, spec) -> float:
    """Block-quantization MSE over the channels that are not outliers (absmax <= 4x the median):
    what reordering is for (normal channels no longer share a block scale with an outlier).
    """
    flat = t.reshape(-1, t.shape[-1])
    err = (fake_quantize(flat, spec) - flat).square().mean(0)
    absmax = flat.abs().amax(0)
    return float(err[absmax <= 4 * absmax.median()].mean())


def test_per_head_permutations_cluster_each_heads_outliers(backend, tmp_path):
    """MHA with K outliers at different positions in each head: one permutation per head keeps
    each head's outliers in one block of 8; one shared permutation cannot (16 positions).
    Exact on both graph kinds.
    """
    from conftest import Case
    from models import llama_inputs, massive_channel_outliers

    torch.manual_seed(0)
    model = massive_channel_outliers(
        TinyLlama(dim=128, hidden=128, heads=4, kv_heads=4), factor=50.0, count=0
    )
    case = Case("mha_llama", model, [llama_inputs(dim=128, seed=i) for i in range(3)], ["x"])
    spec = get_format("bfp12")
    errs = {}
    for per_head in (True, False):
        view = case.view(backend, tmp_path)
        batches = case.batches_for(backend)
        pss = Reorder(ReorderConfig(block=8, linear_inputs=False, per_head=per_head))
        values = [s.value for s in pss.sites(view, PassContext()).found]
        ref = view.run(batches[-1])
        result = run_pass(view, pss, batches, PassContext(), verify=True)
        assert max_relative_error(ref, view.run(batches[-1])) <= 1e-4
        details = " | ".join(n.detail for n in result.plan.applied_sites)
        assert ("(4 permutations)" in details) == per_head, details
        if backend == "fx":
            after = view.observe(values, batches[-1])
            errs[per_head] = sum(_normal_channel_mse(t, spec) for t in after.values())
    if errs:
        assert errs[True] < 0.8 * errs[False], errs
