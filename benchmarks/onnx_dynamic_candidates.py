"""Dynamic INT8 activations in ONNX Runtime: which op pattern runs a W8A8 linear fastest.

One linear [rows, K] @ [K, N] at MiniLM's shapes (384 -> 1536 and 1536 -> 384), rows = 128
(batch 1 x 128 tokens) and 4096 (32 x 128), CPU provider, 2 threads, median of interleaved runs:

- ``qpass per-token (uint8+128)``: what `lowering/onnxruntime.py` emits (via `qpass.quantize`):
  per-row absmax -> scale -> Round -> +128 -> Cast uint8, MatMulInteger u8 x s8 (a_zero_point
  128), Cast, Mul row scale, Mul channel scale. Faithful to the recipe (per token).
- ``per-token int8 x int8``: the same with int8 codes and no zero point. Faithful.
- ``DynamicQuantizeLinear + MatMulInteger``: ONNX's own dynamic op: per TENSOR, asymmetric uint8
  (not the recipe's semantics: one outlier token coarsens every token).
- ``com.microsoft DynamicQuantizeMatMul``: the fused contrib op, also per tensor.
- ``FP32 MatMul``: the reference.

Writes benchmarks/results/onnx_dynamic_candidates.{md,json}. Usage::

    .venv/bin/python benchmarks/onnx_dynamic_candidates.py      # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qpass

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((384, 1536), (1536, 384))
ROWS = (128, 4096)


def _model(nodes, inits, k: int, n: int, domain: bool = False) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", n])],
        inits,
    )
    ops = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if domain else [])
    return helper.make_model(graph, opset_imports=ops).SerializeToString()


def candidates(w: np.ndarray, calib: np.ndarray) -> dict[str, bytes]:
    k, n = w.shape
    fp = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")], k, n)
    recipe = {"weights": {"format": "int8"}, "activations": {"granularity": "per_token", "dynamic": True}}
    ours = qpass.quantize(onnx.load_from_string(fp), recipe, {"x": calib}).SerializeToString()
    ws = np.abs(w).max(0) / 127
    wq = np.round(w / ws).astype(np.int8)
    i = [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(ws.astype(np.float32), "ws")]
    c = [
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(127, np.float32), "qmax"),
        numpy_helper.from_array(np.array(128, np.float32), "off"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(np.array(1e-30, np.float32), "tiny"),
    ]
    s8 = [
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
        helper.make_node("Div", ["m", "qmax"], ["s0"]),
        helper.make_node("Max", ["s0", "tiny"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["d"]),
        helper.make_node("Round", ["d"], ["r"]),
        helper.make_node("Cast", ["r"], ["q"], to=TensorProto.INT8),
        helper.make_node("MatMulInteger", ["q", "Wq"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "s"], ["g"]),
        helper.make_node("Mul", ["g", "ws"], ["y"]),
    ]
    u8 = [
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
        helper.make_node("Div", ["m", "qmax"], ["s0"]),
        helper.make_node("Max", ["s0", "tiny"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["d"]),
        helper.make_node("Round", ["d"], ["r"]),
        helper.make_node("Add", ["r", "off"], ["r8"]),
        helper.make_node("Cast", ["r8"], ["q"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", ["q", "Wq", "zp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "s"], ["g"]),
        helper.make_node("Mul", ["g", "ws"], ["y"]),
    ]
    dql = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"]),
        helper.make_node("MatMulInteger", ["q", "Wq", "qz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["qs", "ws"], ["sc"]),
        helper.make_node("Mul", ["f", "sc"], ["y"]),
    ]
    dqmm = [helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "ws"], ["y"], domain="com.microsoft")]
    return {
        "FP32 MatMul": fp,
        "qpass per-token (uint8+128)": ours,
        "hand-built per-token uint8+128": _model(u8, i + c, k, n),
        "per-token int8 x int8": _model(s8, i + c, k, n),
        "DynamicQuantizeLinear + MatMulInteger (per tensor)": _model(dql, i, k, n),
        "com.microsoft DynamicQuantizeMatMul (per tensor)": _model(dqmm, i, k, n, domain=True),
    }


def session(proto: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = []
    for k, n in SHAPES:
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        calib = rng.standard_normal((64, k)).astype(np.float32)
        sessions = {name: session(p) for name, p in candidates(w, calib).items()}
        for rows in ROWS:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            x[:, 7] *= 20.0  # an outlier channel, as in real activations
            ref = sessions["FP32 MatMul"].run(None, {"x": x})[0]
            for s in sessions.values():
                s.run(None, {"x": x})
            samples: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(args.runs):
                for name, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {"x": x})
                    samples[name].append((time.perf_counter() - t0) * 1e3)
            for name, s in sessions.items():
                err = float(np.linalg.norm(s.run(None, {"x": x})[0] - ref) / np.linalg.norm(ref))
                out.append(
                    {
                        "k": k,
                        "n": n,
                        "rows": rows,
                        "candidate": name,
                        "ms": statistics.median(samples[name]),
                        "rel_err": err,
                    }
                )
                print(out[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_dynamic_candidates.json").write_text(
        json.dumps({"runs": args.runs, "results": out}, indent=2)
    )
    lines = [
        "# Dynamic INT8 linear in ONNX Runtime: candidate op patterns",
        "",
        f"`benchmarks/onnx_dynamic_candidates.py`; CPU provider, 2 threads, median of {args.runs} interleaved runs "
        "on shared cores. rel err: vs the FP32 MatMul, activations with one x20 outlier channel.",
        "",
        "| K x N | rows | candidate | ms | vs FP32 | rel err |",
        "|---|---:|---|---:|---:|---:|",
    ]
    fp = {(r["k"], r["rows"]): r["ms"] for r in out if r["candidate"] == "FP32 MatMul"}
    for r in out:
        lines.append(
            f"| {r['k']}x{r['n']} | {r['rows']} | {r['candidate']} | {r['ms']:.3f} | "
            f"{r['ms'] / fp[(r['k'], r['rows'])]:.2f} | {r['rel_err']:.4f} |"
        )
    (RESULTS / "onnx_dynamic_candidates.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
