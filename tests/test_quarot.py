"""QuaRot layout (`rotate: {layout: residual}`): one rotation through the whole residual stream,
found from graph structure, exact on both graph kinds; LayerNorm streams, tied embeddings,
post-LN skips; and the point of it: lower W4A4 per-token error on models with massive channels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Case
from models import (
    TinyLlama,
    TinyOpt,
    inject_stream_outliers,
    opt_inputs,
    stream_outlier_inputs,
)

from qpass.graph.refs import OpKind
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.norm_fusion import FuseNorms, FuseNormsConfig
from qpass.passes.rotate import Rotate, RotateConfig, RotationLayout
from qpass.qconfig import ActGranularity, ActivationQuantConfig, WeightQuantConfig
from qpass.quant.error import linear_output_errors, mean_error

QUAROT = RotateConfig(layout=RotationLayout.RESIDUAL)


def quarot(view, batches, fuse: bool = True):
    """fuse_norms (optional) then the QuaRot rotation, both verified; returns the rotate result."""
    if fuse:
        run_pass(view, FuseNorms(FuseNormsConfig()), batches, PassContext(), verify=True)
    return run_pass(view, Rotate(QUAROT), batches, PassContext(), verify=True)


def stream_notes(result):
    return [n for n in result.plan.notes if n.site.startswith("residual stream")]


@pytest.fixture(scope="module")
def opt_case() -> Case:
    torch.manual_seed(0)
    return Case("tiny_opt", TinyOpt().eval(), [opt_inputs(seed=i) for i in range(3)], ["ids"])


def test_llama_residual_stream_is_rotated_offline(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    batches = llama_case.batches_for(backend)
    before = view.run(batches[-1])
    result = quarot(view, batches)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    (stream,) = stream_notes(result)
    assert stream.applied and "hadamard Sylvester 64 (64x64)" in stream.detail
    # writers: 2 o_proj + 2 down_proj rows; readers: q,k,v,gate,up x 2 layers + head columns
    assert "offline into 15 constants, 1 online" in stream.detail and "input 'x' (online)" in stream.detail
    carried = [n for n in result.plan.notes if n.detail == "carries the residual stream's rotation"]
    assert len(carried) == 5  # every norm output: no per-site rotation needed there
    # one rotation at the graph input + the two online Hadamards before down_proj
    assert len(view.ops_of(OpKind.ROTATION)) == 3


def test_unfused_norm_gamma_reads_through_an_online_inverse(llama_case):
    view = llama_case.view("fx", None)
    before = view.run(llama_case.batches[-1])
    result = quarot(view, llama_case.batches, fuse=False)
    assert max_relative_error(before, view.run(llama_case.batches[-1])) <= 1e-4
    (stream,) = stream_notes(result)
    assert (
        stream.detail.count("online inverse: 'layers.") + stream.detail.count("online inverse: 'norm.") == 5
    )


def test_layernorm_stream_gets_a_rotation_that_keeps_the_mean(opt_case, backend, onnx_dir):
    """OPT-like: LayerNorm readers commute with Q when 1 Q = 1; the embedding table takes Q."""
    view = opt_case.view(backend, onnx_dir)
    batches = opt_case.batches_for(backend)
    before = view.run(batches[-1])
    result = quarot(view, batches)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    (stream,) = stream_notes(result)
    assert stream.applied and "reflected so that 1 Q = 1" in stream.detail
    assert " table" in stream.detail and "online" not in stream.detail.split(":")[0]
    assert len(view.ops_of(OpKind.ROTATION)) == 2  # fc2 inputs (after ReLU) only


def test_tied_embedding_is_rotated_consistently(backend, tmp_path):
    """Head and embedding share one table: it stays as it is; Q is applied after the lookup and
    undone before the final norm (its gamma cannot be fused into a shared table).
    """
    torch.manual_seed(0)
    model = TinyOpt().eval()
    model.head.weight = model.embed.weight
    case = Case("tied_opt", model, [opt_inputs(seed=i) for i in range(3)], ["ids"])
    view = case.view(backend, tmp_path)
    batches = case.batches_for(backend)
    before = view.run(batches[-1])
    result = quarot(view, batches)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    (stream,) = stream_notes(result)
    (lookup,) = [op for op in view.ops() if op.op_type in ("embedding", "Gather")]
    table = view.op_inputs(lookup)[0]
    if view.const_users(table) > 1:  # torch.export keeps the tie; the ONNX exporter may copy the table
        assert "table shared, online" in stream.detail
        assert "online inverse" in stream.detail
    else:
        assert f"{lookup.op_type} '{lookup.name}' table" in stream.detail
    assert backend == "onnx" or view.const_users(table) == 2


def test_post_ln_stream_is_skipped_with_a_reason(bert_case, backend, onnx_dir):
    view = bert_case.view(backend, onnx_dir)
    batches = bert_case.batches_for(backend)
    before = view.run(batches[-1])
    result = quarot(view, batches)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    notes = stream_notes(result)
    assert notes and not any(n.applied for n in notes)
    assert any("writes the stream (post-LN)" in n.detail for n in notes)
    assert any("offline via" in n.detail for n in result.plan.applied_sites)  # per-site rotations stay


def test_width_without_hadamard_still_rotates_and_says_how(backend, tmp_path):
    torch.manual_seed(0)
    model = TinyLlama(dim=92, hidden=96, heads=4, kv_heads=2, layers=1).eval()
    case = Case("llama92", model, [torch.randn(2, 8, 92) for _ in range(2)], ["x"])
    view = case.view(backend, tmp_path)
    batches = case.batches_for(backend)
    before = view.run(batches[-1])
    (stream,) = stream_notes(quarot(view, batches))
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    assert stream.applied and "random orthogonal (no Hadamard matrix of order 92) (92x92)" in stream.detail


W4 = WeightQuantConfig(format="int4", algo="gptq")
A4 = ActivationQuantConfig(format="int4", granularity=ActGranularity.PER_TOKEN, dynamic=True)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_w4a4_error_at_least_5x_lower_with_massive_channels(family, backend, tmp_path):
    """Per-layer W4A4 (per-token INT4 activations, INT4 GPTQ weights) relative squared output
    error, averaged over the linears, on models whose residual stream carries massive channels.
    """
    torch.manual_seed(0)
    if family == "llama":
        model = inject_stream_outliers(TinyLlama(), factor=20.0)
        case = Case("so_llama", model, [stream_outlier_inputs(seed=i, factor=20.0) for i in range(3)], ["x"])
    else:
        model = inject_stream_outliers(TinyOpt(), factor=20.0)
        case = Case("so_opt", model, [opt_inputs(seed=i) for i in range(3)], ["ids"])
    plain = case.view(backend, tmp_path)
    batches = case.batches_for(backend)
    rotated = case.view(backend, tmp_path)
    quarot(rotated, batches)
    err_plain = mean_error(linear_output_errors(plain, batches, W4, A4))
    err_rotated = mean_error(linear_output_errors(rotated, batches, W4, A4))
    assert err_rotated * 5 <= err_plain, (err_plain, err_rotated)


@pytest.mark.slow
def test_smollm2_quarot_is_exact_and_handles_the_tied_embedding():
    """Real SmolLM2-135M (torch): 576 = 36 x 16 and 1536 = 12 x 128 Hadamards, tied lm_head."""
    from qpass import zoo
    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture, clone_graph_module

    model, tok = zoo.load_smollm2()
    rows = zoo.packed_token_rows(tok, "calib", 32, 2)
    view = FxGraphView(clone_graph_module(capture(model, rows)))
    before = view.run(rows)
    result = quarot(view, [rows])
    assert max_relative_error(before, view.run(rows)) <= 1e-4
    (stream,) = stream_notes(result)
    assert stream.applied and "36 ⊗ Sylvester 16 (576x576)" in stream.detail
    # the embedding table is lm_head's weight: Q after the lookup, Q^T before the final norm
    assert "table shared, online" in stream.detail and "online inverse: 'model.norm.weight'" in stream.detail
    assert "offline into 210 constants, 2 online" in stream.detail  # 30 x (7 linears) = 210
    down = [n for n in result.plan.applied_sites if "(1536x1536) online" in n.detail]
    assert len(down) == 30 and all("12" in n.detail for n in down)


A8 = ActivationQuantConfig(format="int8", granularity=ActGranularity.PER_TOKEN, dynamic=True)
W4_RTN = WeightQuantConfig(format="int4")


def _damped_llama(factor: float = 30.0) -> torch.nn.Module:
    """SmolLM2's pattern: massive residual channels that every norm's gamma damps (~1/factor^2),
    so the linears after the norms see ordinary values; fused, the gammas no longer damp them.
    """
    torch.manual_seed(0)
    model = TinyLlama().eval()
    with torch.no_grad():
        for block in model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                # distinct gammas: ONNX export shares identical initializers, which blocks fusion
                norm.weight.uniform_(0.5, 1.5)
                norm.weight[[3, 17]] = 1.0 / factor**2
    return model


@pytest.mark.parametrize("acts", [A8, A4], ids=["a8", "a4"])
def test_keep_gamma_auto_keeps_damping_gammas_and_stays_exact(acts, backend, tmp_path):
    model = _damped_llama()
    case = Case("damped", model, [stream_outlier_inputs(seed=i) for i in range(3)], ["x"])
    batches = case.batches_for(backend)
    ctx = PassContext(weights=W4_RTN, activations=acts)
    errors = {}
    for keep in ("never", "auto"):
        view = case.view(backend, tmp_path)
        before = view.run(batches[-1])
        fused = run_pass(view, FuseNorms(FuseNormsConfig(keep_gamma=keep)), batches, ctx, verify=True)
        rotated = run_pass(view, Rotate(QUAROT), batches, ctx, verify=True)
        assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
        kept = [n for n in fused.plan.notes if n.detail.startswith("gamma kept (keep_gamma: auto)")]
        # the four damping norms are kept and read through an online inverse; the final norm
        # (gamma 1) is fused either way
        assert len(kept) == (4 if keep == "auto" else 0)
        (stream,) = stream_notes(rotated)
        assert stream.detail.count("online inverse") == len(kept)
        errors[keep] = mean_error(linear_output_errors(view, batches, W4_RTN, acts))
    assert errors["auto"] * 2 <= errors["never"], errors


def test_keep_gamma_auto_fuses_uniform_gammas(llama_case):
    """Nothing to protect (gammas of one): auto fuses every norm, as 'never' does."""
    view = llama_case.view("fx", None)
    ctx = PassContext(weights=W4_RTN, activations=A8)
    result = run_pass(view, FuseNorms(FuseNormsConfig(keep_gamma="auto")), llama_case.batches, ctx, verify=True)
    assert not [n for n in result.plan.notes if n.detail.startswith("gamma kept")]
    assert len(result.plan.applied_sites) == 5
