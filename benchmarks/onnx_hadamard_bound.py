"""Why online Hadamard cannot add <= 10% to the int8 linear it feeds in stock ONNX Runtime on CPU.

A rotation that is not fused into the linear is at least one separate op reading and writing the
activation [B, 128, n] in float32; the cheapest such op (one elementwise Mul by a constant) is
the memory floor of any form. Forms beyond it, n = 1536 (the down-projection input):
- `kron a·b(·c)`: one batched MatMul per Kronecker factor (what `qpass.lowering.onnx_functions`
  ships: the best of every grouping of up to 4 factors, `benchmarks/onnx_hadamard.py`);
  sum(factors) multiply-adds per element, one pass per factor;
- `butterfly stage`: one radix-2 stage (Split halves, Add, Sub, Concat); a full fast transform
  needs log2(n / 12) = 7 of them plus a 12-point stage, so >= 8x this;
- the n x n constant MatMul;
- block-diagonal I ⊗ H_32 / H_128: one MatMul on [rows, n/b, b], a weaker rotation that only
  mixes within blocks (the rotate pass would have to apply that rotation instead).
Each is timed next to the linear it feeds, W4A8 as `w4a8-rotate` lowers it (per-token int8 +
MatMulIntegerToFloat) and FP32: session wall time (interleaved; it includes copying the feed and
the fetch, so small forms look dearer) and ORT profiler kernel time (the ops alone), each as a
fraction of the W4A8 linear's.

Writes benchmarks/results/onnx_hadamard_bound.{md,json}. Usage::

    flock /tmp/qpass-cpu.lock .venv/bin/python benchmarks/onnx_hadamard_bound.py   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_dynamic_profile import kernel_times
from onnx_hadamard import BATCHES, SEQ, graph_model, lowered, quantized_linear, session, time_all

from qpass.math.hadamard import hadamard

RESULTS = Path(__file__).resolve().parent / "results"
N = 1536
FEEDS = {"SmolLM2 down_proj": 576, "MiniLM FFN down": 384}
KRON = [(48, 32), (12, 128), (12, 8, 16), (24, 8, 8)]


def elementwise_model(n: int) -> onnx.ModelProto:
    """One Mul by a constant: one read and one write of the activation, the floor of any unfused op."""
    return _model(
        n, [helper.make_node("Mul", ["x", "c"], ["y"])], [numpy_helper.from_array(np.float32(0.5), "c")]
    )


def butterfly_stage_model(n: int) -> onnx.ModelProto:
    """One radix-2 stage of the fast transform: [a, b] -> [a + b, a - b] over the last axis."""
    nodes = [
        helper.make_node("Split", ["x"], ["a", "b"], axis=-1, num_outputs=2),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Sub", ["a", "b"], ["d"]),
        helper.make_node("Concat", ["s", "d"], ["y"], axis=-1),
    ]
    return _model(n, nodes, [])


def block_diagonal_model(n: int, b: int) -> onnx.ModelProto:
    """I_(n/b) ⊗ H_b: one [rows * n/b, b] @ [b, b] MatMul (a weaker rotation, a different pass)."""
    h = hadamard(b, dtype=torch.float32).numpy()
    nodes = [
        helper.make_node("Reshape", ["x", "blocks"], ["xb"]),
        helper.make_node("MatMul", ["xb", "H"], ["yb"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["yb", "shape"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.asarray([0, 0, n // b, b], np.int64), "blocks"),
        numpy_helper.from_array(h, "H"),
    ]
    return _model(n, nodes, inits)


def _model(n: int, nodes: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def kernel_ms(proto: bytes | onnx.ModelProto, x: np.ndarray, runs: int) -> float:
    """Sum of ORT profiler kernel times per run (no feed/fetch copies, no run overhead)."""
    if isinstance(proto, onnx.ModelProto):
        proto = proto.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "p")
        s = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
        return sum(kernel_times(s, {"x": x}, runs).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    plain = hadamard(N, dtype=torch.float32).numpy()
    rot = graph_model(N, None, plain, None)
    forms = {
        "elementwise pass (floor)": elementwise_model(N),
        "butterfly stage (1 of >= 8)": butterfly_stage_model(N),
        **{f"kron {'·'.join(map(str, c))}": lowered(rot, "kron", c) for c in KRON},
        "constant 1536x1536 MatMul": rot,
        "block-diagonal H_32 (weaker rotation)": block_diagonal_model(N, 32),
        "block-diagonal H_128 (weaker rotation)": block_diagonal_model(N, 128),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, k in FEEDS.items():
            w = (rng.standard_normal((N, k)) / math.sqrt(N)).astype(np.float32)
            models = {
                "W4A8 linear": quantized_linear(graph_model(N, k, None, w), N, Path(tmp), f"lin{k}"),
                "FP32 linear": graph_model(N, k, None, w),
                **forms,
            }
            sessions = {name: session(m) for name, m in models.items()}
            for b in BATCHES:
                x = rng.standard_normal((b, SEQ, N)).astype(np.float32)
                t = time_all(sessions, x, args.runs)
                kern = {name: kernel_ms(m, x, args.runs) for name, m in models.items()}
                rows.append({"linear": f"{label} {N}→{k}", "batch": b, "ms": t, "kernel_ms": kern})
                print(rows[-1], flush=True)
    res = {"runs": args.runs, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_hadamard_bound.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "onnx_hadamard_bound.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    la, lb = res["loadavg_before"], res["loadavg_after"]
    lines = [
        "# Online Hadamard vs the int8 linear it feeds: the floor in stock ONNX Runtime (CPU)",
        "",
        f"`benchmarks/onnx_hadamard_bound.py`, CPU provider, 2 threads, median of {res['runs']} interleaved "
        f"runs, input [B, 128, 1536]. Load average {la[0]:.1f} before, {lb[0]:.1f} after (2 shared cores).",
        "",
        "Each form's session wall time (includes copying feed and fetch) and ORT profiler kernel time, as a "
        "fraction of the W4A8 linear's (per-token int8 + MatMulIntegerToFloat, the form `w4a8-rotate` "
        "ships). Target of issue #7: <= 10%.",
        "",
    ]
    for r in res["rows"]:
        t, kern = r["ms"], r["kernel_ms"]
        lin, klin = t["W4A8 linear"], kern["W4A8 linear"]
        lines += [
            f"### {r['linear']}, B = {r['batch']}: W4A8 {lin:.3f} ms wall / {klin:.3f} ms kernels, "
            f"FP32 {t['FP32 linear']:.3f} / {kern['FP32 linear']:.3f} ms",
            "",
            "| form | wall ms | / W4A8 wall | kernel ms | / W4A8 kernels |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {v:.3f} | {v / lin:.1%} | {kern[k]:.3f} | {kern[k] / klin:.1%} |"
            for k, v in t.items()
            if k not in ("W4A8 linear", "FP32 linear")
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
