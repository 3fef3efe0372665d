"""Rotations: exact on both graph kinds, offline where a producer linear absorbs Q (no new op),
online elsewhere (one inserted op per site), and they flatten outliers so W8A8 error drops.
"""

from __future__ import annotations

import collections

import pytest
import torch

import qpass
from qpass.calibration import StatKind, StatRequest, calibrate
from qpass.graph.refs import OpKind
from qpass.graph.view import iter_linear_ops
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.rotate import Rotate, RotateConfig, RotationKind, block_diagonal


@pytest.mark.parametrize("kind", ["hadamard", "random", "klt", "duquant"])
def test_rotation_preserves_function(case, backend, onnx_dir, kind):
    view = case.view(backend, onnx_dir)
    batches = case.batches_for(backend)
    before = view.run(batches[-1])
    result = run_pass(view, Rotate(RotateConfig(RotationKind(kind))), batches, PassContext(), verify=True)
    assert result.plan.applied_sites
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4


def test_offline_and_online_sites(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    n_ops = len(list(view.ops()))
    result = run_pass(view, Rotate(RotateConfig()), llama_case.batches_for(backend), PassContext())
    notes = {n.site: n.detail for n in result.plan.applied_sites}
    offline = [d for d in notes.values() if "offline" in d]
    online = [d for d in notes.values() if "online" in d]
    assert len(offline) == 2 and all("per head of size 16" in d for d in offline)  # v_proj -> o_proj, GQA
    assert len(online) == 7  # norms' outputs (gamma not fused yet) and down_proj inputs
    rotations = view.ops_of(OpKind.ROTATION)
    assert len(rotations) == len(online)
    assert len(list(view.ops())) == n_ops + len(online)
    # inserted rotations are not quantizable layers
    assert len(list(iter_linear_ops(view))) == 15


def test_offline_only_adds_no_op(bert_case, backend, onnx_dir):
    view = bert_case.view(backend, onnx_dir)
    n_ops = len(list(view.ops()))
    result = run_pass(view, Rotate(RotateConfig(online=False)), bert_case.batches_for(backend), PassContext())
    assert len(result.plan.applied_sites) == 2  # attention output projections
    assert any(
        "fuse norms first" in n.detail or "not per-channel affine" in n.detail
        for n in result.plan.skipped_sites
    )
    assert len(list(view.ops())) == n_ops


def test_online_hadamard_flattens_down_proj_outliers(llama_case):
    view = llama_case.view("fx", None)
    down_inputs = [
        view.linear_input(op)
        for op in iter_linear_ops(view)
        if view.producer(view.linear_input(op)).kind is OpKind.MUL
        and view.constant_operand(view.producer(view.linear_input(op))) is None
    ]
    assert len(down_inputs) == 2
    ratio = lambda st: float(st.absmax.max() / st.absmax.median())  # noqa: E731
    before = calibrate(view, llama_case.batches, [StatRequest(v) for v in down_inputs], progress=False)
    run_pass(view, Rotate(RotateConfig()), llama_case.batches, PassContext())
    rotated = [
        view.op_output(op)
        for op in view.ops_of(OpKind.ROTATION)
        if any(view.value_operands(op)[0] == v for v in down_inputs)
    ]
    after = calibrate(view, llama_case.batches, [StatRequest(v) for v in rotated], progress=False)
    assert max(ratio(after[v]) for v in rotated) < min(ratio(before[v]) for v in down_inputs) / 5


def test_rotation_recipe_lowers_w8a8_error(llama_case):
    """Per-token dynamic W8A8 (torch path; ONNX lowering of dynamic activations comes later)."""

    def recipe(passes: list) -> dict:
        return {
            "passes": passes,
            "weights": {"format": "int8"},
            "activations": {"granularity": "per_token", "dynamic": True},
        }

    x = llama_case.batches[-1]
    ref = llama_case.reference(x)
    err = lambda m: float((m(x) - ref).norm() / ref.norm())  # noqa: E731
    plain = qpass.quantize(llama_case.model, recipe([]), llama_case.batches)
    rotated = qpass.quantize(
        llama_case.model, recipe([{"rotate": {"kind": "hadamard", "online": True}}]), llama_case.batches
    )
    assert err(rotated) < 0.7 * err(plain)


def test_rotated_onnx_model_quantizes_and_keeps_rotations_float(llama_case, onnx_dir):
    recipe = {"passes": [{"rotate": {"kind": "hadamard"}}], "weights": {"format": "int8"}, "activations": {}}
    q = qpass.quantize(str(llama_case.onnx_path(onnx_dir)), recipe, llama_case.onnx_calib())
    ops = collections.Counter(n.op_type for n in q.graph.node)
    marked = [n for n in q.graph.node if any(p.key == "qpass.kind" for p in n.metadata_props)]
    assert len(marked) == 7 and all(n.op_type == "MatMul" for n in marked)
    producers = {o: n for n in q.graph.node for o in n.output}
    assert all(producers.get(n.input[1]) is None for n in marked)  # rotation matrices stay float constants
    assert ops["QuantizeLinear"] >= 9


def test_block_diagonal_and_klt_stats(llama_case):
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    b = block_diagonal(q, 12)
    torch.testing.assert_close(b @ b.T, torch.eye(12, dtype=torch.float64))
    view = llama_case.view("fx", None)
    requests = Rotate(RotateConfig(RotationKind.KLT)).stat_requests(view, PassContext())
    assert requests and all(StatKind.XTX in r.kinds for r in requests)
    assert not Rotate(RotateConfig()).stat_requests(view, PassContext())
    st = calibrate(view, llama_case.batches, requests[:1], progress=False)[requests[0].value]
    assert st.xtx.shape == (st.channels, st.channels)


def test_width_without_hadamard_gets_a_reported_fallback(backend, tmp_path):
    """92 channels: no Hadamard construction; a valid rotation is used and the report says which."""

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 92), torch.nn.Linear(92, 8)

        def forward(self, x):
            return self.b(self.a(x))

    from conftest import Case

    c = Case("odd", Odd().eval(), [torch.randn(2, 3, 8)], ["x"])
    view = c.view(backend, tmp_path)
    result = run_pass(view, Rotate(RotateConfig()), c.batches_for(backend), PassContext(), verify=True)
    (note,) = [n for n in result.plan.applied_sites if "92x92" in n.detail]
    assert "random orthogonal (no Hadamard matrix of order 92)" in note.detail and "offline" in note.detail


def test_online_hadamard_signs_fold_into_the_producer(llama_case, backend, onnx_dir):
    """Q = diag(s) H: s goes into up_proj's rows (through the SwiGLU product) or a norm's gamma.

    The inserted op is the bare H; the function is unchanged (verify).
    """
    view = llama_case.view(backend, onnx_dir)
    batches = llama_case.batches_for(backend)
    before = view.run(batches[-1])
    result = run_pass(view, Rotate(RotateConfig()), batches, PassContext(), verify=True)
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4
    inserted = [e for e in result.plan.edits if type(e).__name__ == "InsertRotation"]
    assert inserted and all(e.hadamard_signs is not None for e in inserted)
    assert all(bool((e.hadamard_signs == 1).all()) for e in inserted)
    notes = [n.detail for n in result.plan.applied_sites if "online" in n.detail]
    # the two down_proj inputs (width 160): through the SwiGLU product into up_proj's rows
    assert sum("(160x160)" in d and "signs folded into" in d and " <- " in d for d in notes) == 2
    assert all("signs folded into" in d for d in notes)
