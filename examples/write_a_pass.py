"""Write a pass once, run it on torch.fx and ONNX: fold every norm's gamma into the linears it feeds.

A pass reads the graph through `GraphView`, reuses the shared site finder, and answers with an
`EditPlan`; the pass manager applies it and checks the function is unchanged.

    .venv/bin/python examples/write_a_pass.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import TinyLlama, inject_outliers, llama_inputs  # noqa: E402 - the test suite's small LLaMA

from qpass.graph.edits import EditPlan, ScaleChannels, SiteNote  # noqa: E402
from qpass.graph.fx import FxGraphView  # noqa: E402
from qpass.graph.fx_capture import capture  # noqa: E402
from qpass.graph.onnx import OnnxGraphView  # noqa: E402
from qpass.graph.onnx_load import load_model  # noqa: E402
from qpass.graph.regions import find_absorber, find_sites  # noqa: E402
from qpass.pass_base import PassContext, QPass  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402


class FoldGamma(QPass):
    """gamma -> 1 on norms (x * gamma) whose output only feeds linears; W[:, j] *= gamma_j."""

    name = "fold_gamma"

    def plan(self, view, stats, ctx) -> EditPlan:
        plan = EditPlan(self.name)
        for site in find_sites(view)[0]:
            absorber = find_absorber(view, site.value, site.channels)
            producer = view.producer(site.value)
            const_act = view.constant_operand(producer) if producer is not None else None
            if isinstance(absorber, str) or const_act is None or absorber.targets[0][0] != const_act[0]:
                plan.notes.append(SiteNote(site.label, False, "not fed by a norm's gamma multiply"))
                continue
            (gamma, axis), *_ = absorber.targets
            g = view.read(gamma).reshape(-1)
            for sink in site.sinks:
                plan.edits.append(ScaleChannels(sink.weight.const, sink.weight.in_axis, g, site=site.label))
            plan.edits.append(ScaleChannels(gamma, axis, 1.0 / g, site=site.label))
            plan.notes.append(SiteNote(site.label, True, f"folded gamma of {gamma.name}"))
        return plan


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
