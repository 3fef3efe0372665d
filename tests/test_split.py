"""SplitQuant: exact on both graph kinds (one fused linear + unflatten + sum per layer), skips
explained, config validated, and the split weights quantize with lower error than whole ones.
"""

from __future__ import annotations

import pytest
import torch

import qpass
from qpass.errors import ConfigError
from qpass.graph.view import iter_linear_ops
from qpass.pass_base import PassContext
from qpass.pass_manager import max_relative_error, run_pass
from qpass.passes.split import SplitQuant, SplitQuantConfig, kmeans_1d, split_weight
from qpass.qconfig import WeightQuantConfig
from qpass.quant.qlinear import fake_quant_weight


def test_split_preserves_function(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    batches = case.batches_for(backend)
    n_linear = len(list(iter_linear_ops(view)))
    before = view.run(batches[-1])
    result = run_pass(view, SplitQuant(SplitQuantConfig()), batches, PassContext(), verify=True)
    assert len(result.plan.applied_sites) == n_linear
    assert len(list(iter_linear_ops(view))) == n_linear  # parts fused into one linear per layer
    assert max_relative_error(before, view.run(batches[-1])) <= 1e-4


def test_skip_reasons(backend, tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(32, 32)
            self.small = torch.nn.Linear(4, 32)

        def forward(self, x):
            return self.a(torch.relu(self.a(x))) + self.small(x[..., :4])

    from conftest import Case

    c = Case("tied_split", Tied().eval(), [torch.randn(2, 3, 32)], ["x"])
    view = c.view(backend, tmp_path)
    plan = SplitQuant(SplitQuantConfig()).plan(view, None, PassContext())
    reasons = " | ".join(n.detail for n in plan.skipped_sites)
    assert "shared by 2 ops" in reasons
    assert "4 input features < min_in_features" in reasons
    assert not plan.edits


def test_kmeans_and_parts():
    torch.manual_seed(0)
    w = torch.cat([torch.randn(500) * 0.1, torch.full((20,), 3.0), torch.full((20,), -3.0)])
    labels, centroids = kmeans_1d(w, 3, 25)
    assert centroids[0] < -2.5 and abs(float(centroids[1])) < 0.1 and centroids[2] > 2.5
    assert (labels[-20:] == 0).all() and (labels[-40:-20] == 2).all()
    parts, _ = split_weight(w.reshape(20, 27), 3, 25)
    torch.testing.assert_close(sum(parts), w.reshape(20, 27))


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_split_weights_quantize_better(fmt):
    """Per-row RTN of the concatenated parts vs of the whole weight (heavy-tailed weights)."""
    w = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02
    cfg = WeightQuantConfig(format=fmt)
    whole = float((fake_quant_weight(w, cfg) - w).square().mean())
    parts, _ = split_weight(w, 3, 25)
    q = fake_quant_weight(torch.cat(parts), cfg).reshape(3, *w.shape).sum(0)
    assert float((q - w).square().mean()) < whole / 1.2


def test_config_validation_and_recipe(llama_case):
    with pytest.raises(ConfigError, match=r"split_quant\.parts"):
        SplitQuantConfig(parts=1)
    with pytest.raises(ConfigError, match=r"split_quant\.iters"):
        SplitQuantConfig(iters=0)
    recipe = qpass.get_recipe("int4-splitquant")
    assert recipe.passes[0].name == "split_quant" and recipe.weights.format == "int4"
    x = llama_case.batches[-1]
    q = qpass.quantize(llama_case.model, recipe, llama_case.batches[:2])
    ref = llama_case.reference(x)
    assert float((q(x) - ref).norm() / ref.norm()) < 0.3
