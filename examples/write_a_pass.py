"""Write a pass once, register it, and run it by recipe name on torch.fx and ONNX.

The pass folds each RMSNorm's gamma into the linears the norm feeds (gamma -> 1, W[:, j] *= gamma_j),
an exact rewrite. It reads as match -> check -> rewrite: `sites` lists candidates with the shared
region walker (`qpass.graph.regions`), `check` skips a site with a reason, `rewrite` gives its edits.
The default `plan` turns that into an `EditPlan` with a note per site; the pass manager applies it
and checks the model's function is unchanged. Adding a pass to qpass itself is the same class in
`passes/<name>.py` plus one line in `qpass.registry.PASSES`; from outside, `register_pass` does it.

    .venv/bin/python examples/write_a_pass.py
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import qpass
from qpass.graph.edits import ScaleChannels
from qpass.graph.regions import Site, find_absorber, find_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.registry import register_pass


@dataclass(frozen=True)
class FoldGammaConfig:
    """`min_gamma`: leave a norm alone when some |gamma_j| is below it. Folding a tiny gamma into the
    weights shrinks those input columns toward zero, which costs weight quantization resolution
    (SmolLM2's massive residual channels have gammas near 1e-4).
    """

    min_gamma: float = 1e-3


class FoldGamma(QPass[FoldGammaConfig, Site]):
    """gamma -> 1 on norms (x * gamma) whose output only feeds linears; W[:, j] *= gamma_j."""

    name = "fold_gamma"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Site]:
        return SiteList(*find_sites(view))  # found sites, and (label, reason) for the rejected

    def check(self, site: Site, view: GraphView, stats, ctx: PassContext) -> str | None:
        absorber = find_absorber(view, site.value, site.channels)
        producer = view.producer(site.value)
        const_act = view.constant_operand(producer) if producer is not None else None
        if isinstance(absorber, str) or const_act is None or absorber.targets[0][0] != const_act[0]:
            return "not fed by a norm's gamma multiply"
        gamma = view.read(absorber.targets[0][0])
        if float(gamma.abs().min()) < self.config.min_gamma:
            return f"a gamma entry is below min_gamma={self.config.min_gamma:g}"
        return None

    def rewrite(self, site: Site, view: GraphView, stats, ctx: PassContext) -> Rewrite:
        (gamma, axis), *_ = find_absorber(view, site.value, site.channels).targets
        g = view.read(gamma).reshape(-1)
        edits = [ScaleChannels(s.weight.const, s.weight.in_axis, g, site=site.label) for s in site.sinks]
        edits.append(ScaleChannels(gamma, axis, 1.0 / g, site=site.label))
        return Rewrite(edits, f"folded gamma of {gamma.name}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class TinyMLPNet(nn.Module):
    """Two pre-norm MLP blocks and a norm + head: three norms, each feeding linears."""

    def __init__(self, dim: int = 32, hidden: int = 64, vocab: int = 48) -> None:
        super().__init__()
        self.norms = nn.ModuleList([RMSNorm(dim), RMSNorm(dim)])
        self.ups = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(dim, hidden)])
        self.downs = nn.ModuleList([nn.Linear(hidden, dim), nn.Linear(hidden, dim)])
        self.final_norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(torch.nn.functional.gelu(up(norm(x))))
        return self.head(self.final_norm(x))


RECIPE = {"name": "fold-then-w8a8", "passes": ["fold_gamma"], "weights": {"format": "int8"},
          "activations": {"format": "int8", "granularity": "per_token", "dynamic": True}}  # fmt: skip


def main() -> None:
    register_pass("fold_gamma", FoldGammaConfig, FoldGamma)  # recipes may now name it
    torch.manual_seed(0)
    model = TinyMLPNet().eval()
    calib = [torch.randn(4, 16, 32) for _ in range(4)]
    test = torch.randn(2, 16, 32)
    with torch.no_grad():
        reference = model(test).numpy()

    # torch.fx: nn.Module in, quantized GraphModule out
    fx = qpass.quantize_with_report(model, RECIPE, calib, example_inputs=(calib[0],))
    with torch.no_grad():
        fx_out = fx.model(test).numpy()

    # ONNX: the same recipe on the exported model
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "tiny.onnx", Path(tmp) / "tiny.q.onnx"
        torch.onnx.export(model, (calib[0],), str(src), input_names=["x"], dynamo=True,
                          dynamic_shapes={"x": {0: "batch", 1: "seq"}})  # fmt: skip
        onnx = qpass.quantize_file(src, dst, RECIPE, {"x": torch.cat(calib).numpy()})
        onnx_out = ort.InferenceSession(str(dst)).run(None, {"x": test.numpy()})[0]

    for kind, result, out in (("fx", fx, fx_out), ("onnx", onnx, onnx_out)):
        fold = result.report.results[0]
        rel = float(np.abs(out - reference).max() / np.abs(reference).max())
        print(f"{kind:5s} {fold.plan.summary()}; fold max rel err {fold.max_rel_error:.1e}; "
              f"W8A8 output rel err {rel:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
