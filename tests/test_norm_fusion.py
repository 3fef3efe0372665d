"""Norm fusion: gammas (and betas) move into the consuming linears, exactly, on both graph kinds."""

from __future__ import annotations

import torch

from qpass.graph.refs import OpKind
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.norm_fusion import FuseNorms, FuseNormsConfig


def test_fusion_preserves_function_and_sets_gamma_to_one(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    batches = case.batches_for(backend)
    before = view.run(batches[-1])
    result = run_pass(view, FuseNorms(FuseNormsConfig()), batches, PassContext(), verify=True)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    fused = [n.detail.removeprefix("folded ").split(" and ")[0] for n in result.plan.applied_sites]
    assert fused
    consts = {c.name: c for op in view.ops() for c in view.op_inputs(op) if hasattr(c, "shape")}
    for name in fused:
        torch.testing.assert_close(view.read(consts[name]), torch.ones(consts[name].shape))


def test_llama_norms_all_fused(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    result = run_pass(view, FuseNorms(FuseNormsConfig()), llama_case.batches_for(backend), PassContext())
    assert len(result.plan.applied_sites) == 5  # 2 layers x (input, post-attention) + final norm


def test_layernorm_beta_goes_into_biases(bert_case, backend, onnx_dir):
    """The OPT-style pre-LN block: LayerNorm(gamma, beta) -> fc_in (with bias)."""
    view = bert_case.view(backend, onnx_dir)
    result = run_pass(view, FuseNorms(FuseNormsConfig()), bert_case.batches_for(backend), PassContext())
    (note,) = result.plan.applied_sites
    assert " and " in note.detail  # beta folded too
    norm = next(op for op in view.ops_of(OpKind.LAYER_NORM) if view.norm_params(op).gamma.name in note.detail)
    torch.testing.assert_close(view.read(view.norm_params(norm).beta), torch.zeros(64))
    # post-LN norms feed the residual: not fusable, and said so
    assert any("also feeds" in n.detail for n in result.plan.skipped_sites)
