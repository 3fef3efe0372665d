"""Online Hadamard in ONNX Runtime: the function op (O(n log n) FWHT) vs the constant MatMul.

For each size the rotate pass uses on MiniLM (384, 1536) and SmolLM2 (576, 1536), times
x @ diag(s)H as (a) a MatMul with the n x n constant and (b) `qpass.HadamardTransform{n}`
(lowering/onnx_functions.py), and, as the yardstick of the "adds <= 10%" target, (c) the n x n
linear layer the rotation feeds. Activations [rows, n] with rows = 128 (batch 1 x 128 tokens)
and 4096 (batch 32 x 128); CPU provider, 2 intra-op threads, median of interleaved runs.
(b) in both function-body forms: "kron" (one [p, p] MatMul for the Sylvester factor, the default)
and "butterfly" (log2 p add/sub stages). The result decides `lowering.onnx_functions.FWHT_MIN_SIZE`.

Writes benchmarks/results/onnx_hadamard.{md,json}. Usage::

    .venv/bin/python benchmarks/onnx_hadamard.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from lowering.onnx_functions import lower_rotations
from passes.rotation_math import randomized_hadamard
from qpass.graph.onnx import KIND_KEY
from qpass.qconfig import RotationOp

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (384, 576, 1536)
ROWS = (128, 4096)


def matmul_model(n: int, matrix: np.ndarray, rotation: bool) -> bytes:
    node = helper.make_node("MatMul", ["x", "Q"], ["y"], name="rotate")
    if rotation:
        node.metadata_props.add(key=KIND_KEY, value="rotation")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", n])],
        [numpy_helper.from_array(matrix, "Q")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def fwht_model(proto: bytes, form: str = "butterfly") -> bytes:
    import onnx

    model = ir.serde.deserialize_model(onnx.load_from_string(proto))
    assert lower_rotations(model, RotationOp.FWHT, 18, form)
    return ir.serde.serialize_model(model).SerializeToString()


def session(proto: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])


def time_all(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int) -> dict[str, float]:
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"x": x})
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rows_out = []
    rng = np.random.default_rng(0)
    for n in SIZES:
        q = randomized_hadamard(n, 0).to(torch.float32).numpy()
        mm = matmul_model(n, q, rotation=True)
        sessions = {
            "matmul": session(mm),
            "fwht": session(fwht_model(mm)),
            "kron": session(fwht_model(mm, "kron")),
            "linear": session(matmul_model(n, rng.standard_normal((n, n)).astype(np.float32), False)),
        }
        for rows in ROWS:
            x = rng.standard_normal((rows, n)).astype(np.float32)
            t = time_all(sessions, x, args.runs)
            rows_out.append({"n": n, "rows": rows, **{f"{k}_ms": v for k, v in t.items()}})
            print(rows_out[-1], flush=True)
    faster = sorted({r["n"] for r in rows_out} - {r["n"] for r in rows_out if r["kron_ms"] >= r["matmul_ms"]})
    res = {"runs": args.runs, "threads": 2, "results": rows_out, "kron_faster_at_all_rows": faster}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_hadamard.json").write_text(json.dumps(res, indent=2))
    lines = [
        "# Online Hadamard in ONNX Runtime: function op (FWHT) vs constant MatMul",
        "",
        f"`benchmarks/onnx_hadamard.py`, CPU provider, 2 threads, median of {args.runs} interleaved runs.",
        "`linear` is an n x n MatMul with a dense weight: the layer a rotation feeds.",
        "",
        "| n | rows | MatMul ms | fn kron ms | fn butterfly ms | kron / MatMul | kron / linear |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['n']} | {r['rows']} | {r['matmul_ms']:.3f} | {r['kron_ms']:.3f} | {r['fwht_ms']:.3f} | "
            f"{r['kron_ms'] / r['matmul_ms']:.2f} | {r['kron_ms'] / r['linear_ms']:.2f} |"
        )
    lines += [
        "",
        f"Function op (kron) faster than the MatMul at every row count for n in: {faster or 'none'}",
    ]
    (RESULTS / "onnx_hadamard.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
