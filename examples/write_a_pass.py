"""Write a pass once, run it on torch.fx and ONNX: fold every norm's gamma into the linears it feeds.

A pass reads the graph through `GraphView` as match -> check -> rewrite: `sites` lists candidates
with the shared region walker (`qpass.graph.regions`), `check` skips one with a reason, `rewrite`
gives its edits; the default `plan` turns that into an `EditPlan` (a note per site), which the
pass manager applies, checking the function is unchanged.

    .venv/bin/python examples/write_a_pass.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import TinyLlama, inject_outliers, llama_inputs  # noqa: E402 - the test suite's small LLaMA

from qpass.graph.edits import ScaleChannels  # noqa: E402
from qpass.graph.fx import FxGraphView  # noqa: E402
from qpass.graph.fx_capture import capture  # noqa: E402
from qpass.graph.onnx import OnnxGraphView  # noqa: E402
from qpass.graph.onnx_load import load_model  # noqa: E402
from qpass.graph.regions import Site, find_absorber, find_sites  # noqa: E402
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402


class FoldGamma(QPass[None, Site]):
    """gamma -> 1 on norms (x * gamma) whose output only feeds linears; W[:, j] *= gamma_j."""

    name = "fold_gamma"

    def sites(self, view, ctx) -> SiteList[Site]:
        return SiteList(*find_sites(view))  # found sites, (label, reason) for the rejected

    def check(self, site, view, stats, ctx) -> str | None:
        absorber = find_absorber(view, site.value, site.channels)
        producer = view.producer(site.value)
        const_act = view.constant_operand(producer) if producer is not None else None
        if isinstance(absorber, str) or const_act is None or absorber.targets[0][0] != const_act[0]:
            return "not fed by a norm's gamma multiply"
        return None

    def rewrite(self, site, view, stats, ctx) -> Rewrite:
        (gamma, axis), *_ = find_absorber(view, site.value, site.channels).targets
        g = view.read(gamma).reshape(-1)
        edits = [ScaleChannels(s.weight.const, s.weight.in_axis, g, site=site.label) for s in site.sinks]
        edits.append(ScaleChannels(gamma, axis, 1.0 / g, site=site.label))
        return Rewrite(edits, f"folded gamma of {gamma.name}")


def main() -> None:
    model = inject_outliers(TinyLlama())
    x = llama_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "tiny_llama.onnx"
        torch.onnx.export(model, (x,), input_names=["x"], dynamo=True).save(str(onnx_path))
        views = {
            "fx": (FxGraphView(capture(model, (x,))), [x]),
            "onnx": (OnnxGraphView(load_model(onnx_path)), [{"x": x.numpy()}]),
        }
        for kind, (view, batches) in views.items():
            result = run_pass(view, FoldGamma(None), batches, PassContext(), verify=True)
            print(f"{kind:5s} {result.plan.summary()}  max rel err {result.max_rel_error:.1e}")


if __name__ == "__main__":
    main()
