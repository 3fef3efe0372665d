"""Peak memory and time of qpass on a synthetic ~2.5 GB ONNX model with external data.

The model (LayerNorm -> MatMul [d, d] -> residual, repeated) is written to disk weight by weight,
so building it needs little memory. Each measured run is a fresh child process (`--child`);
its peak RSS (ru_maxrss: anonymous memory plus resident pages of memory-mapped weights) and
wall time are read by the parent and written to benchmarks/results/big_model_memory.md (+ .json).

    python benchmarks/big_model_memory.py [--dim 4096 --layers 40] [--runs fuse_norms,w8a8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

RESULTS = Path(__file__).parent / "results"

RUNS = {
    # name: (recipe, verify, what it exercises)
    "fuse_norms": (
        {"passes": [{"fuse_norms": {}}]},
        False,
        "load (memory-mapped) -> fold every norm into its MatMul (all weights rewritten) -> streamed save",
    ),
    "fuse_norms+verify": (
        {"passes": [{"fuse_norms": {}}]},
        True,
        "as above, plus ONNX Runtime runs the model before/after the pass (session built from files)",
    ),
    "w8a8": (
        "w8a8",
        True,
        "calibration through ONNX Runtime, INT8 weights + QDQ activations, streamed save",
    ),
}


def _external(name: str, dims: tuple[int, ...], data: Path, offset: int, nbytes: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(nbytes))):
        t.external_data.add(key=key, value=value)
    return t


def write_model(folder: Path, dim: int, layers: int) -> Path:
    """The synthetic model, its weights streamed into one external data file."""
    path, data = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, x, offset = [], [], "x", 0
    with open(data, "wb") as fh:
        for i in range(layers):
            for name, arr in (
                (f"g{i}", (1 + 0.3 * rng.standard_normal(dim)).astype(np.float32)),
                (f"b{i}", np.zeros(dim, np.float32)),
                (
                    f"W{i}",
                    (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32),
                ),
            ):
                fh.write(arr.tobytes())
                inits.append(_external(name, arr.shape, data, offset, arr.nbytes))
                offset += arr.nbytes
            nodes += [
                helper.make_node(
                    "LayerNormalization", [x, f"g{i}", f"b{i}"], [f"h{i}"], name=f"ln{i}", axis=-1
                ),
                helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                helper.make_node("Add", [x, f"m{i}"], [f"r{i}"], name=f"res{i}"),
            ]
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", dim]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "big", [vi[0]], [vi[1]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def child(run: str, src: str, dst: str, calib: str) -> None:
    from qpass.api import quantize_file

    recipe, verify, _ = RUNS[run]
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after importing torch & co
    t0 = time.perf_counter()
    result = quantize_file(src, dst, recipe, calib, verify=verify, batch_size=2)
    elapsed = time.perf_counter() - t0
    changed = sum(len(r.plan.applied_sites) for r in result.report.results)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "sites": changed, "peak_kib": peak_kib, "base_kib": base_kib}))


def measure(run: str, src: Path, dst: Path, calib: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", run, str(src), str(dst), str(calib)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode < 0:
        return {"run": run, "error": f"killed by signal {-proc.returncode} (SIGKILL: out of memory?)"}
    if proc.returncode != 0:
        return {
            "run": run,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
        }
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out_bytes = dst.stat().st_size + sum(p.stat().st_size for p in dst.parent.glob(f"{dst.name}.data"))
    return {
        "run": run,
        "peak_rss_gib": out["peak_kib"] / 1024**2,
        "baseline_rss_gib": out["base_kib"] / 1024**2,  # the interpreter with torch/onnxruntime loaded
        "quantize_seconds": out["seconds"],
        "process_seconds": wall,
        "sites": out["sites"],
        "output_gib": out_bytes / 1024**3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--runs", default="fuse_norms,fuse_norms+verify,w8a8")
    p.add_argument("--workdir", default=None, help="folder for the model files (default: a temp folder)")
    p.add_argument(
        "--model", default=None, help="reuse a big.onnx written by an earlier run (same --dim/--layers)"
    )
    p.add_argument("--keep", action="store_true", help="keep results of runs not repeated this time")
    p.add_argument("--child", nargs=4, metavar=("RUN", "SRC", "DST", "CALIB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="qpass-big-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        src = Path(args.model) if args.model else write_model(folder, args.dim, args.layers)
        build_s = time.perf_counter() - t0
        model_bytes = src.stat().st_size + (src.parent / "big.onnx.data").stat().st_size
        calib = folder / "calib.npz"
        np.savez(calib, x=np.random.default_rng(1).standard_normal((2, 4, args.dim)).astype(np.float32))
        rows = []
        for run in args.runs.split(","):
            out_dir = folder / run
            out_dir.mkdir()
            row = measure(run, src, out_dir / "q.onnx", calib)
            if "peak_rss_gib" in row:
                row["peak_over_model"] = row["peak_rss_gib"] * 1024**3 / model_bytes
                row["growth_over_model"] = (
                    (row["peak_rss_gib"] - row["baseline_rss_gib"]) * 1024**3 / model_bytes
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in out_dir.iterdir():
                f.unlink()
    meta = {
        "model_gib": model_bytes / 1024**3,
        "dim": args.dim,
        "layers": args.layers,
        "build_seconds": build_s,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": __import__("onnxruntime").__version__,
        "onnx_ir": __import__("onnx_ir").__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / "big_model_memory.json"
    old = json.loads(json_path.read_text())["runs"] if json_path.is_file() and args.keep else []
    rows = [r for r in old if r["run"] not in {row["run"] for row in rows}] + rows
    json_path.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    lines = [
        "# Big model: peak memory and time",
        "",
        f"Synthetic ONNX model, {meta['model_gib']:.2f} GiB of float32 weights in external data "
        f"({args.layers} x [LayerNorm -> MatMul {args.dim}x{args.dim} -> residual]). Each run is a fresh "
        "process; peak RSS is its ru_maxrss (includes resident pages of memory-mapped weights). "
        f"Machine: {meta['cpu_count']} CPU cores shared with other jobs, so times are upper bounds.",
        "Command: `python benchmarks/big_model_memory.py`",
        "",
        "| run | what | peak RSS GiB | peak / model size | RSS after imports GiB | "
        "(peak - imports) / model | quantize s | output GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        what = RUNS[row["run"]][2]
        if "error" in row:
            lines.append(f"| {row['run']} | {what} | failed: {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {row['run']} | {what} | {row['peak_rss_gib']:.2f} | {row['peak_over_model']:.2f}x | "
            f"{row['baseline_rss_gib']:.2f} | {row['growth_over_model']:.2f}x | {row['quantize_seconds']:.0f} | "
            f"{row['output_gib']:.2f} |"
        )
    (RESULTS / "big_model_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
