"""The online Hadamard op: equals the dense rotation, traces under torch.export, and is what the
rotate pass inserts on torch graphs.
"""

from __future__ import annotations

import pytest
import torch

from qpass.kernels.hadamard import hadamard_transform
from qpass.math.hadamard import random_signs, randomized_hadamard
from qpass.pass_base import PassContext
from qpass.pass_manager import run_pass
from qpass.passes.rotate import Rotate, RotateConfig


@pytest.mark.parametrize("n", [64, 384, 576, 1536])
def test_equals_dense_randomized_hadamard(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    s = random_signs(n, 7)
    torch.testing.assert_close(
        hadamard_transform(x, s), x @ randomized_hadamard(n, 7), rtol=1e-10, atol=1e-10
    )


def test_rotate_pass_inserts_the_fast_op_and_the_graph_exports(llama_case):
    view = llama_case.view("fx", None)
    run_pass(view, Rotate(RotateConfig()), llama_case.batches, PassContext(), verify=True)
    fast = [n for n in view.gm.graph.nodes if n.target is torch.ops.qpass.hadamard_transform.default]
    assert len(fast) == 7
    x = llama_case.batches[-1]
    exported = torch.export.export(view.gm, (x,), strict=False)
    assert any(n.target is torch.ops.qpass.hadamard_transform.default for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), llama_case.reference(x), rtol=1e-4, atol=1e-4)
