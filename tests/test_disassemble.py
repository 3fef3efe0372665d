"""QLLM channel disassembly: exact on both graph kinds, the width grows only at the split sites,
the activation's range shrinks, and sites it cannot fold (norm or GELU producers) are skipped
with the reason.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Case
from models import TinyBert, TinyLlama, bert_inputs, llama_inputs, massive_channel_outliers

import qpass
from qpass.errors import ConfigError
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.disassemble import Disassemble, DisassembleConfig, choose_splits, expansion


@pytest.fixture(scope="module")
def massive_cases() -> dict[str, Case]:
    torch.manual_seed(0)
    llama = massive_channel_outliers(TinyLlama(dim=64, hidden=128, heads=4, kv_heads=2), factor=100.0)
    torch.manual_seed(0)
    bert = massive_channel_outliers(TinyBert(dim=64, hidden=128, heads=4), factor=100.0)
    return {
        "llama": Case("massive_llama", llama, [llama_inputs(seed=i) for i in range(3)], ["x"]),
        "bert": Case("massive_bert", bert, [bert_inputs(seed=i) for i in range(3)], ["x", "mask"]),
    }


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_disassembly_is_exact_and_shrinks_the_range(massive_cases, name, backend, tmp_path):
    case = massive_cases[name]
    view = case.view(backend, tmp_path)
    batches = case.batches_for(backend)
    ops = [op.op_type for op in view.ops()]
    before = view.run(batches[-1])
    result = run_pass(view, Disassemble(DisassembleConfig()), batches, PassContext(), verify=True)
    applied = result.plan.applied_sites
    # LLaMA: both SwiGLU down_proj inputs; BERT: the ReLU fc_out input (fc2 follows GELU)
    assert len(applied) == (2 if name == "llama" else 1), [n.detail for n in result.plan.notes]
    assert [op.op_type for op in view.ops()] == ops  # constants only: no runtime op
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    reasons = " | ".join(n.detail for n in result.plan.skipped_sites)
    assert "head layout" in reasons  # V -> o_proj
    if name == "bert":
        assert "f(x / T) != f(x) / T" in reasons  # GELU before fc2
    for note in applied:
        assert "+" in note.detail and "absmax" in note.detail
        lo, hi = note.detail.split("absmax ")[1].split(" -> ")
        assert float(hi) < float(lo) / 2  # the outliers (x100) are split down, within 10% more channels


def test_disassembled_graph_quantizes_and_lowers(massive_cases):
    """The widened consumers go through the normal quantize + torch lowering."""
    case = massive_cases["llama"]
    x = case.batches[-1]
    ref = case.reference(x)
    errs = {}
    for passes in ([], [{"disassemble": {}}]):
        recipe = {
            "passes": passes,
            "weights": {"format": "int8"},
            "activations": {"format": "int8", "granularity": "per_tensor"},
            "target": "torch",
        }
        q = qpass.quantize(case.model, recipe, case.batches[:2])
        errs[bool(passes)] = float((q(x) - ref).norm() / ref.norm())
    assert errs[True] < errs[False], errs


def test_choose_splits_and_expansion():
    absmax = torch.tensor([1.0, 1.2, 0.9, 40.0, 1.1, 1.0, 0.8, 1.0] * 4)
    splits = choose_splits(absmax, DisassembleConfig(max_extra=1.0))
    assert int((splits > 1).sum()) == 4 and int(splits.max()) >= 8 and int(splits.sum()) - 32 <= 32
    index, scale = expansion(torch.tensor([1, 3, 1]))
    assert index.tolist() == [0, 1, 2, 1, 1]
    torch.testing.assert_close(scale, torch.tensor([1.0, 1 / 3, 1.0, 1 / 3, 1 / 3], dtype=torch.float64))
    fixed = choose_splits(absmax, DisassembleConfig(threshold=8.0, max_extra=1.0))
    assert fixed[3] == 5 and int((fixed > 1).sum()) == 4
    assert int(choose_splits(absmax, DisassembleConfig(max_extra=0.05)).sum()) - 32 <= 1


def test_config_validation():
    with pytest.raises(ConfigError, match=r"disassemble\.max_extra"):
        DisassembleConfig(max_extra=0.0)
    with pytest.raises(ConfigError, match=r"disassemble\.threshold"):
        DisassembleConfig(threshold=0.5)
    recipe = qpass.get_recipe({"passes": [{"disassemble": {}}]})
    assert recipe.passes[0].name == "disassemble"
    builtin = qpass.get_recipe("w8a8-disassemble")
    assert builtin.passes[0].name == "disassemble" and builtin.activations.format == "int8"


class _TwoLinears(torch.nn.Module):
    """x -> fc1 (+bias) -> fc2: the linear producer case, with 2 outlier output rows in fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 48)
        self.fc2 = torch.nn.Linear(48, 16)
        with torch.no_grad():
            self.fc1.weight[[5, 30]] *= 50.0
            self.fc1.bias[[5, 30]] *= 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_expand_channels_contract(backend, tmp_path):
    """ExpandChannels on both adapters: constants rebuilt with a new width, the widened value's
    recorded shape follows, the function is unchanged.
    """
    torch.manual_seed(0)
    case = Case("two_linears", _TwoLinears().eval(), [torch.randn(2, 8, 32) for _ in range(3)], ["x"])
    view = case.view(backend, tmp_path)
    batches = case.batches_for(backend)
    before = view.run(batches[-1])
    result = run_pass(
        view, Disassemble(DisassembleConfig(max_extra=0.5)), batches, PassContext(), verify=True
    )
    (note,) = result.plan.applied_sites
    assert "2 outlier channels" in note.detail
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    fc2 = [op for op in view.ops() if view.weight(op) is not None][-1]
    width = view.weight(fc2).in_features
    assert width > 48
    assert view.shape(view.linear_input(fc2))[-1] == width


@pytest.mark.slow
def test_minilm_has_no_foldable_site_and_stays_exact(tmp_path):
    """Real MiniLM on FX and ONNX: every linear input comes from a LayerNorm (residual), GELU or
    attention, so nothing is split, each skip says why, and the function is untouched.
    """
    from qpass import zoo
    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture, clone_graph_module
    from qpass.graph.onnx import OnnxGraphView
    from qpass.graph.onnx_load import load_model

    embedder, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", 8), batch_size=4, max_len=32)
    torch_batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    path = zoo.export_minilm_onnx(tmp_path / "minilm.onnx", embedder=embedder)
    for view, bs in (
        (FxGraphView(clone_graph_module(capture(embedder, torch_batches[0]))), torch_batches),
        (OnnxGraphView(load_model(path)), batches),
    ):
        before = view.run(bs[-1])
        result = run_pass(view, Disassemble(DisassembleConfig()), bs, PassContext(), verify=True)
        assert not result.plan.applied_sites and not result.plan.edits
        reasons = " | ".join(n.detail for n in result.plan.skipped_sites)
        assert "residual" in reasons or "also feeds" in reasons  # LayerNorm outputs
        if view.backend == "fx":  # ONNX decomposes GELU (x * 0.5 * (1 + erf(x / sqrt 2))): other words
            assert "head layout" in reasons and "f(x / T) != f(x) / T" in reasons
        assert max_relative_error(before, view.run(bs[-1])) <= 1e-4


def test_width_padded_to_the_weight_group(massive_cases):
    """With grouped weights the widened input is padded with zero channels to a multiple of the
    group, so INT4 g32 quantization of the consumers still tiles (and the FP function holds).
    """
    case = massive_cases["llama"]
    x = case.batches[-1]
    ref = case.reference(x)
    recipe = {"passes": [{"disassemble": {}}], "weights": {"format": "int4", "group": 32}, "target": "torch"}
    report = qpass.quantize_with_report(case.model, recipe, case.batches[:2])
    widths = [m._weight.shape[1] for m in report.model.modules() if type(m).__name__ == "QuantLinear"]
    assert any(w > 128 and w % 32 == 0 for w in widths), widths
    with torch.no_grad():
        assert float((report.model(x) - ref).norm() / ref.norm()) < 0.2


def test_site_whose_shape_feeds_a_reshape_is_skipped_on_onnx():
    """Found by the property test: in ONNX an attention block sizes its head reshape from the
    input's Shape; widening that input would break the reshape, so the site is skipped.
    """
    from random_graphs import BlockSpec, GraphSpec
    from test_equivalence_property import check_equivalence

    from qpass.passes.disassemble import DisassembleConfig

    spec = GraphSpec(
        dim=24,
        blocks=(
            BlockSpec(
                kind="attn",
                hidden=8,
                norm="layer",
                act="relu",
                residual="none",
                bias=True,
                heads=1,
                side_branch=False,
            ),
            BlockSpec(
                kind="attn",
                hidden=8,
                norm="none",
                act="relu",
                residual="none",
                bias=False,
                heads=1,
                side_branch=False,
            ),
        ),
        conv=False,
        outlier_channels=(),
        outlier_factor=1.0,
        head_bias=False,
        seed=0,
    )
    check_equivalence("onnx", spec, [("disassemble", DisassembleConfig())])
