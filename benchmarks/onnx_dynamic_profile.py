"""Where per-token `w8a8-dynamic` loses to ORT's per-tensor `quantize_dynamic`: ORT's profiler.

One linear x [32, 128, K] @ W [K, N] + b (the MiniLM FFN shapes), quantized by each tool from
the same float model (ORT `quantize_dynamic` QInt8 per channel; qpass `w8a8-dynamic`, and the
same recipe with per-tensor activations, ORT's granularity), then
per-op kernel time from ORT's profiler (sum over runs / runs) and interleaved wall time.
ORT's optimizer turns its DynamicQuantizeLinear + MatMulInteger + scale Muls + bias Add into one
com.microsoft DynamicQuantizeMatMul (per-tensor min/max, quantize, GEMM, scale and bias in the
epilogue); a per-token scale cannot enter that op or MatMulIntegerToFloat (both take a scalar
activation scale), so qpass's form pays separate passes for the row scale and the bias.
With ``--models FILE ...``: the same per-op-type breakdown for whole model files at batch 32 x 128
(e.g. the MiniLM / SmolLM2 files `onnxruntime_vs_peers.py --workdir` keeps).

Writes benchmarks/results/onnx_dynamic_profile.{md,json}. Usage::

    flock /tmp/qpass-cpu.lock .venv/bin/python benchmarks/onnx_dynamic_profile.py   # ~1 min
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import quantization as ortq

import qpass

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((384, 1536), (1536, 384))
BATCH, SEQ = 32, 128
PER_TENSOR = {  # w8a8-dynamic at ORT's granularity (symmetric: ORT's is asymmetric uint8)
    "name": "w8a8-dynamic-per-tensor",
    "passes": [],
    "weights": {"format": "int8", "symmetric": True},
    "activations": {"format": "int8", "granularity": "per_tensor", "dynamic": True},
    "target": "onnxruntime",
}


def linear(k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def session(path: Path, profile: str | None = None, spin: bool = False) -> ort.InferenceSession:
    """2 threads; no spin-waiting unless `spin` (the peers benchmark's setting; ORT's default spins)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_times(s: ort.InferenceSession, feed: dict, runs: int) -> dict[str, float]:
    """Kernel ms per op type and run of a profiling session, from ORT's profiler (2 warm-up runs dropped)."""
    for _ in range(2 + runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    by_node: dict[str, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_node[e["name"]].append(e)
    agg: collections.Counter[str] = collections.Counter()
    for node_events in by_node.values():
        for e in sorted(node_events, key=lambda e: e["ts"])[2:]:  # the 2 warm-up runs dropped
            agg[e["args"]["op_name"]] += e["dur"] / runs / 1e3
    return dict(agg.most_common())


def op_times(path: Path, feed: dict, runs: int, tmp: Path) -> dict[str, float]:
    """Kernel ms per op type and run of the model at `path`."""
    return kernel_times(session(path, str(tmp / path.stem)), feed, runs)


def wall(paths: dict[str, Path], feed: dict, runs: int, spin: bool) -> dict[str, float]:
    """Median ms per run; without spinning interleaved, with spinning one session at a time
    (threads spinning after a run would starve the next session's).
    """
    sessions = {k: session(p, spin=spin) for k, p in paths.items()}
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    order = [list(sessions)] * runs if not spin else [[k] * runs for k in sessions]
    for s in sessions.values():
        s.run(None, feed)
    for keys in order:
        for k in keys:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--models", nargs="*", type=Path, default=None, help="whole model files to profile")
    parser.add_argument("--models-input", default="input_ids,attention_mask,token_type_ids")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    res: dict = {"runs": args.runs, "loadavg_before": os.getloadavg(), "linears": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for k, n in SHAPES:
            src = tmp / f"lin{k}x{n}.onnx"
            onnx.save(linear(k, n), src)
            paths = {
                "fp32": src,
                "ORT dynamic": tmp / f"ort{k}.onnx",
                "qpass w8a8-dynamic": tmp / f"qp{k}.onnx",
                "qpass per-tensor": tmp / f"qpt{k}.onnx",
            }
            ortq.quantize_dynamic(
                str(src), str(paths["ORT dynamic"]), weight_type=ortq.QuantType.QInt8, per_channel=True
            )
            calib = [{"x": rng.standard_normal((4, SEQ, k)).astype(np.float32)}]
            qpass.quantize_file(src, paths["qpass w8a8-dynamic"], "w8a8-dynamic", calib)
            qpass.quantize_file(src, paths["qpass per-tensor"], PER_TENSOR, calib)
            feed = {"x": rng.standard_normal((BATCH, SEQ, k)).astype(np.float32)}
            row = {"k": k, "n": n, "wall_ms": wall(paths, feed, args.runs, False)}
            row["wall_spin_ms"] = wall(paths, feed, args.runs, True)
            row["ops_ms"] = {
                name: op_times(p, feed, args.runs, tmp) for name, p in paths.items() if name != "fp32"
            }
            res["linears"].append(row)
            print(row, flush=True)
        if args.models:
            res["models"], res["models_wall_ms"] = {}, {}
            for p in args.models:
                feed = models_feed(p, args.models_input.split(","))
                res["models"][p.stem] = op_times(p, feed, max(2, args.runs // 3), tmp)
                res["models_wall_ms"][p.stem] = {
                    f"spin {label}": wall({p.stem: p}, feed, max(2, args.runs // 3), spin)[p.stem]
                    for label, spin in (("off", False), ("on", True))
                }
                print(p.stem, res["models_wall_ms"][p.stem], res["models"][p.stem], flush=True)
    res["loadavg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_dynamic_profile.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "onnx_dynamic_profile.md").write_text(markdown(res))


def models_feed(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Batch 32 x 128 tokens for a text model's int64 inputs (ids 1000-1999, mask 1)."""
    graph_inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    ids = np.random.default_rng(2).integers(1000, 2000, (BATCH, SEQ), dtype=np.int64)
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: values[n] for n in names if n in graph_inputs}


def markdown(res: dict) -> str:
    la, lb = res["loadavg_before"], res["loadavg_after"]
    lines = [
        "# Per-token `w8a8-dynamic` vs ORT `quantize_dynamic`: where the time goes",
        "",
        f"`benchmarks/onnx_dynamic_profile.py`, CPU provider, 2 threads, x [{BATCH}, {SEQ}, K]; wall: median "
        f"of {res['runs']} interleaved runs; ops: ORT profiler kernel time per run. Load average "
        f"{la[0]:.1f} before, {lb[0]:.1f} after (2 shared cores).",
        "",
    ]
    for r in res["linears"]:
        lines += [
            f"## Linear {r['k']} → {r['n']} + bias",
            "",
            "| wall ms | " + " | ".join(r["wall_ms"]) + " |",
        ]
        lines.append("|---|" + "---:|" * len(r["wall_ms"]))
        for label, key in (
            ("no spinning, interleaved", "wall_ms"),
            ("spinning, one at a time", "wall_spin_ms"),
        ):
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r[key].values()) + " |")
        lines += ["", "Kernel time per run (ms):", "", *_op_table(r["ops_ms"]), ""]
    if res.get("models"):
        lines += [
            "## Whole models, batch 32 x 128",
            "",
            "| model | wall ms, no spinning | wall ms, spinning |",
        ]
        lines.append("|---|---:|---:|")
        for name, w in res["models_wall_ms"].items():
            lines.append(f"| {name} | {w['spin off']:.1f} | {w['spin on']:.1f} |")
        lines += ["", "Kernel time per run by op type (ms):", "", *_op_table(res["models"]), ""]
    return "\n".join(lines)


def _op_table(ops: dict[str, dict[str, float]]) -> list[str]:
    names = list(ops)
    types = sorted(
        {t for v in ops.values() for t in v}, key=lambda t: -max(v.get(t, 0) for v in ops.values())
    )
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {t} | " + " | ".join(f"{ops[n].get(t, 0):.2f}" for n in names) + " |" for t in types]
    lines.append("| **total** | " + " | ".join(f"**{sum(ops[n].values()):.2f}**" for n in names) + " |")
    return lines


if __name__ == "__main__":
    main()
