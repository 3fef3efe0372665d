"""W4A4 per-layer error with and without rotations on the synthetic models with massive channels.

The models of tests/models.py (TinyLlama: RMSNorm, SwiGLU, GQA; TinyOpt: pre-LN LayerNorm,
embedding) with massive residual-stream channels (`inject_stream_outliers`, factor 20). For each
graph kind and transform, the relative squared output error of every linear under INT4 per-token
activations and INT4 per-channel weights (RTN or GPTQ), averaged over the linears
(`qpass.quant.error`). Writes benchmarks/results/synthetic_rotation.{json,md}.

    .venv/bin/python benchmarks/synthetic_rotation.py [--all]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import Case  # noqa: E402
from models import TinyLlama, TinyOpt, inject_stream_outliers, opt_inputs, stream_outlier_inputs  # noqa: E402

from qpass.pass_base import PassContext  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402
from qpass.passes.norm_fusion import FuseNorms, FuseNormsConfig  # noqa: E402
from qpass.passes.rotate import Rotate, RotateConfig, RotationKind, RotationLayout  # noqa: E402
from qpass.qconfig import ActGranularity, ActivationQuantConfig, WeightQuantConfig  # noqa: E402
from qpass.quant.error import linear_output_errors, mean_error  # noqa: E402

OUT = Path(__file__).parent / "results"
FACTOR = 20.0
A4 = ActivationQuantConfig(format="int4", granularity=ActGranularity.PER_TOKEN, dynamic=True)
WEIGHTS = {"rtn": WeightQuantConfig(format="int4"), "gptq": WeightQuantConfig(format="int4", algo="gptq")}
FUSE = FuseNorms(FuseNormsConfig())
TRANSFORMS = {
    "none": [],
    "fuse_norms": [FUSE],
    "quarot (residual hadamard)": [FUSE, Rotate(RotateConfig(layout=RotationLayout.RESIDUAL))],
}
MORE = {  # --all: per-site rotations and the other rotation kinds at the remaining sites
    "per-site hadamard": [FUSE, Rotate(RotateConfig())],
    "quarot + klt sites": [FUSE, Rotate(RotateConfig(RotationKind.KLT, layout=RotationLayout.RESIDUAL))],
    "quarot + duquant sites": [
        FUSE,
        Rotate(RotateConfig(RotationKind.DUQUANT, layout=RotationLayout.RESIDUAL)),
    ],
}


def cases() -> list[Case]:
    torch.manual_seed(0)
    llama = inject_stream_outliers(TinyLlama(), factor=FACTOR)
    torch.manual_seed(0)
    opt = inject_stream_outliers(TinyOpt(), factor=FACTOR)
    return [
        Case("tiny_llama", llama, [stream_outlier_inputs(seed=i, factor=FACTOR) for i in range(3)], ["x"]),
        Case("tiny_opt", opt, [opt_inputs(seed=i) for i in range(3)], ["ids"]),
    ]


def main() -> None:
    transforms = {**TRANSFORMS, **MORE} if "--all" in sys.argv else TRANSFORMS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases():
            for backend in ("fx", "onnx"):
                batches = case.batches_for(backend)
                for name, passes in transforms.items():
                    view = case.view(backend, Path(tmp))
                    for p in passes:
                        run_pass(view, p, batches, PassContext(), verify=True)
                    row = {"model": case.name, "backend": backend, "transform": name}
                    row["a4"] = mean_error(linear_output_errors(view, batches, None, A4))
                    for algo, wcfg in WEIGHTS.items():
                        row[f"w4a4_{algo}"] = mean_error(linear_output_errors(view, batches, wcfg, A4))
                    rows.append(row)
                    print(row, flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "synthetic_rotation.json").write_text(json.dumps(rows, indent=2))
    base = {(r["model"], r["backend"]): r for r in rows if r["transform"] == "none"}
    lines = [
        "# W4A4 per-layer error on synthetic models with massive residual channels",
        "",
        f"Models of tests/models.py with `inject_stream_outliers(factor={FACTOR})`, 3 batches of 4x16 tokens.",
        "Error: relative squared output error of each linear (INT4 per-token symmetric activations;",
        "INT4 per-channel symmetric weights by RTN or GPTQ), averaged over the linears;",
        "'x less' is the no-transform error divided by this one.",
        "",
        "| model | graph | transform | A4 only | W4A4 RTN | W4A4 GPTQ | x less (GPTQ) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base[(r["model"], r["backend"])]
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['transform']} | {r['a4']:.4f} | {r['w4a4_rtn']:.4f} "
            f"| {r['w4a4_gptq']:.4f} | {b['w4a4_gptq'] / r['w4a4_gptq']:.1f} |"
        )
    (OUT / "synthetic_rotation.md").write_text("\n".join([*lines, ""]))


if __name__ == "__main__":
    main()
