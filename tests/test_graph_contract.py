"""The adapter contract: both graph kinds answer the same questions the same way."""

from __future__ import annotations

import pytest
import torch

from qpass.graph.edits import AddBias, EditPlan, ScaleChannels
from qpass.graph.refs import OpKind
from qpass.graph.view import iter_linear_ops
from qpass.quant.qlinear import canonical_weight


def _linear_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_finds_every_linear_with_canonical_weight(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    linears = list(iter_linear_ops(view))
    params = _linear_params(case.model)
    assert len(linears) == len(params)
    found = [canonical_weight(view.read(view.weight(op).const), view.weight(op)) for op in linears]
    # every torch Linear weight [out, in] appears exactly once among the canonical weights
    for p in params:
        assert sum(torch.equal(f, p) for f in found) == 1


def test_producer_and_consumers_agree(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    for op in view.ops():
        out = view.op_output(op)
        assert view.producer(out) == op
        for consumer in view.consumers(out):
            if consumer.name != "<output>":
                assert out in view.value_operands(consumer)


def test_norm_params_and_constant_users(bert_case, backend, onnx_dir):
    view = bert_case.view(backend, onnx_dir)
    norms = view.ops_of(OpKind.LAYER_NORM)
    assert len(norms) == 5
    for op in norms:
        params = view.norm_params(op)
        assert params is not None and params.gamma is not None and params.beta is not None
        assert params.gamma.shape == (64,)
        assert view.const_users(params.gamma) == 1


def test_scale_edit_then_read_back(llama_case, backend, onnx_dir):
    view = llama_case.view(backend, onnx_dir)
    op = next(iter(iter_linear_ops(view)))
    ref = view.weight(op)
    before = view.read(ref.const)
    factors = torch.linspace(0.5, 2.0, ref.in_features)
    changed = view.apply(EditPlan("test", [ScaleChannels(ref.const, ref.in_axis, factors)]))
    after = view.read(ref.const)
    assert changed
    shape = [1, 1]
    shape[ref.in_axis] = -1
    torch.testing.assert_close(after, before * factors.reshape(shape))


def test_observe_returns_linear_inputs(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    values = [view.linear_input(op) for op in iter_linear_ops(view)]
    seen = view.observe(values, case.batches_for(backend)[0])
    for v in values:
        assert seen[v.name].shape[-1] == view.shape(v)[-1]


def test_run_matches_torch(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    batch = case.batches_for(backend)[1]
    out = view.run(batch)[0]
    torch.testing.assert_close(out, case.reference(case.batches[1]), rtol=1e-4, atol=1e-4)


def test_shared_constant_counts_all_users(backend, tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.a(torch.relu(self.a(x)))

    from conftest import Case

    c = Case("tied", Tied().eval(), [torch.randn(2, 3, 8)], ["x"])
    view = c.view(backend, tmp_path)
    ops = list(iter_linear_ops(view))
    assert len(ops) == 2
    assert all(view.const_users(view.weight(op).const) == 2 for op in ops)


@pytest.mark.parametrize("kind", [OpKind.LINEAR, OpKind.LAYER_NORM, OpKind.ATTENTION])
def test_ops_filter_by_kind(bert_case, backend, onnx_dir, kind):
    view = bert_case.view(backend, onnx_dir)
    assert all(op.kind is kind for op in view.ops(frozenset({kind})))


def test_add_bias_creates_then_shifts_a_bias(case, backend, onnx_dir):
    """AddBias on a bias-free linear creates a zero bias first; +d then -d restores the function."""
    view = case.view(backend, onnx_dir)
    batch = case.batches_for(backend)[0]
    ref = view.run(batch)[0]
    bare = [op for op in iter_linear_ops(view) if view.weight(op).bias is None]
    biased = [op for op in iter_linear_ops(view) if view.weight(op).bias is not None]
    assert bare or case.name.startswith("tiny_bert"), "TinyLlama's linears are bias-free"
    changed = 0
    for op in bare[:3] + biased[:1]:
        had = view.weight(op).bias
        d = torch.linspace(-0.5, 0.5, view.weight(op).out_features)
        view.apply(EditPlan("t", edits=[AddBias(op, d)]))
        moved = view.run(batch)[0]
        changed += not torch.allclose(moved, ref, atol=1e-4)  # (a key bias is softmax-invariant)
        bias = view.weight(op).bias
        assert bias is not None and (had is None or bias == had)
        view.apply(EditPlan("t", edits=[AddBias(op, -d)]))
        assert view.weight(op).bias == bias  # the created bias is found again, not duplicated
        assert view.read(bias).abs().max() <= (1e-6 if had is None else view.read(bias).abs().max())
        back = view.run(batch)[0]
        assert torch.allclose(back, ref, atol=1e-5, rtol=1e-5)
    assert changed >= min(2, len(bare[:3] + biased[:1]))


def test_permute_edit_then_read_back_and_restore(llama_case, backend, onnx_dir):
    """PermuteChannels reorders a constant along one axis on both graph kinds; an invalid
    permutation is refused by name; folded into producer rows and consumer columns it is exact.
    """
    from qpass.errors import PassError
    from qpass.graph.edits import CONSTANT_EDITS, PermuteChannels

    assert PermuteChannels in CONSTANT_EDITS
    view = llama_case.view(backend, onnx_dir)
    op = next(iter(iter_linear_ops(view)))
    ref = view.weight(op)
    before = view.read(ref.const)
    perm = torch.randperm(ref.in_features, generator=torch.Generator().manual_seed(0))
    assert view.apply(EditPlan("test", [PermuteChannels(ref.const, ref.in_axis, perm)]))
    torch.testing.assert_close(view.read(ref.const), before.index_select(ref.in_axis, perm))
    with pytest.raises(PassError, match=ref.const.name):
        view.apply(EditPlan("test", [PermuteChannels(ref.const, ref.in_axis, torch.zeros_like(perm))]))


def test_split_op_sums_parts(bert_case, backend, onnx_dir):
    """SplitOp: a linear (with bias) becomes one linear over the concatenated parts, an
    unflatten and a sum, on both graph kinds; the function is unchanged when the parts sum to W.
    """
    from qpass.graph.edits import SplitOp

    view = bert_case.view(backend, onnx_dir)
    batch = bert_case.batches_for(backend)[0]
    before = view.run(batch)
    op = next(o for o in iter_linear_ops(view) if view.weight(o).bias is not None)
    ref = view.weight(op)
    w = canonical_weight(view.read(ref.const), ref)
    b = view.read(ref.bias)
    big = w.abs() > w.abs().median()
    parts = (torch.where(big, w, 0.0), torch.where(big, 0.0, w))
    n_linear, n_ops = len(list(iter_linear_ops(view))), len(list(view.ops()))

    def doubled() -> int:
        shapes = [(view.weight(o).out_features, view.weight(o).in_features) for o in iter_linear_ops(view)]
        return shapes.count((2 * ref.out_features, ref.in_features))

    n_doubled = doubled()
    assert view.apply(EditPlan("test", [SplitOp(op, parts, (b, None))]))
    assert len(list(iter_linear_ops(view))) == n_linear
    assert doubled() == n_doubled + 1
    added = len(list(view.ops())) - n_ops
    assert added == 2  # unflatten/reshape and sum (onnx: MatMul + Add replaced by MatMul + Add)
    torch.testing.assert_close(view.run(batch)[0], before[0], rtol=1e-4, atol=1e-4)
