"""Float and block formats (FP8, MX, NVFP4, BFP) lowered to ONNX: size, agreement with torch, speed.

Part 1, MiniLM (ONNX export, opset 18): for every block format as weights only and as weights +
activations (plus the built-in `mxfp4-reorder`), the file size, the relative difference between
the ONNX Runtime embeddings and the torch target's quantized model of the same recipe, and each
one's distance to FP32 (relative error and mean cosine). 16 calibration and 32 held-out sentences.

Part 2, one linear [rows, K] @ [K, N] in ONNX Runtime (CPU, 1 thread, median of runs): FP32 MatMul
vs the lowered weight forms, `weight_op: auto` (qpass Dequantize function op, which ORT folds at
session creation) and `weight_op: dequantize_linear` (standard DequantizeLinear, opset 21), and
the FakeQuant activation op's cost. The machine is shared: latencies are indicative.

Writes benchmarks/results/onnx_block_formats.{md,json}. Usage::

    .venv/bin/python benchmarks/onnx_block_formats.py            # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import zoo
from qpass.qconfig import BLOCK_FORMATS
from qpass.recipe import Recipe, get_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def _session(data: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def minilm_rows(work: Path, n_calib: int, n_eval: int) -> list[dict]:
    embedder, tok = zoo.load_minilm_embedder()
    path = Path(zoo.export_minilm_onnx(work / "minilm.onnx", embedder=embedder))
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", n_calib), batch_size=16, max_len=64)
    held = zoo.minilm_batches(tok, zoo.sentences("eval", n_eval), batch_size=16, max_len=64)
    ref = np.concatenate([_session(path.read_bytes()).run(["embedding"], b)[0] for b in held])
    torch_calib = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calib]
    rows = [{"recipe": "fp32", "size_mb": path.stat().st_size / 1e6}]
    recipes: list[tuple[str, Recipe]] = []
    for fmt in BLOCK_FORMATS:
        recipes.append((f"w:{fmt}", Recipe.from_dict({"weights": {"format": fmt}})))
        wa = {"weights": {"format": fmt}, "activations": {"format": fmt, "dynamic": True}}
        recipes.append((f"w+a:{fmt}", Recipe.from_dict(wa)))
    recipes.append(("mxfp4-reorder", get_recipe("mxfp4-reorder")))
    for name, recipe in recipes:
        t0 = time.perf_counter()
        q = qpass.quantize(str(path), recipe, calib, verify=False).SerializeToString()
        t_q = time.perf_counter() - t0
        emb = np.concatenate([_session(q).run(["embedding"], b)[0] for b in held])
        qt = qpass.quantize(embedder, recipe, torch_calib, verify=False)
        with torch.no_grad():
            emb_t = np.concatenate(
                [qt(**{k: torch.from_numpy(v) for k, v in b.items()}).numpy() for b in held]
            )
        row = {
            "recipe": name,
            "size_mb": len(q) / 1e6,
            "onnx_vs_torch": _rel(emb, emb_t),
            "onnx_vs_fp32": _rel(emb, ref),
            "torch_vs_fp32": _rel(emb_t, ref),
            "onnx_cos": _cos(emb, ref),
            "torch_cos": _cos(emb_t, ref),
            "quantize_s": t_q,
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def _linear(k: int, n: int, opset: int) -> bytes:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def _time(data: bytes, x: np.ndarray, runs: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    sess = _session(data)
    t_init = time.perf_counter() - t0
    sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, t_init * 1e3


def linear_rows(runs: int, k: int = 1536, n: int = 1536) -> list[dict]:
    import onnx

    fp = _linear(k, n, 21)
    calib = {"x": np.random.default_rng(1).standard_normal((64, k)).astype(np.float32)}
    forms = [("fp32", None)]
    for fmt in ("fp8_e4m3", "mxfp8", "mxint8", "bfp12"):
        forms.append((f"w:{fmt} auto", {"weights": {"format": fmt}}))
        forms.append(
            (
                f"w:{fmt} dequantize_linear",
                {"weights": {"format": fmt}, "lowering": {"weight_op": "dequantize_linear"}},
            )
        )
    for fmt in ("mxfp4", "nvfp4"):
        forms.append((f"w:{fmt} auto", {"weights": {"format": fmt}}))
    for fmt in ("mxfp8", "mxfp4", "nvfp4"):
        forms.append(
            (f"w+a:{fmt} auto", {"weights": {"format": fmt}, "activations": {"format": fmt, "dynamic": True}})
        )
    out = []
    for name, recipe in forms:
        data = (
            fp if recipe is None else qpass.quantize(onnx.load_from_string(fp), recipe, calib, verify=False)
        )
        data = data if isinstance(data, bytes) else data.SerializeToString()
        row = {"form": name, "size_mb": len(data) / 1e6}
        for r in (1, 512):
            x = np.random.default_rng(2).standard_normal((r, k)).astype(np.float32)
            row[f"ms_rows{r}"], row["init_ms"] = _time(data, x, runs)
        print(row, flush=True)
        out.append(row)
    return out


def write(minilm: list[dict], linear: list[dict], args) -> None:
    lines = [
        "# Float and block formats in ONNX Runtime (`benchmarks/onnx_block_formats.py`)",
        "",
        f"MiniLM ONNX export (opset 18), {args.calib} calibration / {args.eval} held-out sentences. "
        "`onnx vs torch`: relative difference of the ONNX Runtime embeddings from the torch target's "
        "quantized model of the same recipe (same weight codes; activations are quantized by the "
        "same arithmetic, bit for bit on equal inputs, but the two graphs' float ops differ in the "
        "last bits and rounding flips compound layer by layer). `w:` weights only, `w+a:` weights "
        "and dynamic activations in the format's own blocks (simulated: quantize-dequantize, then a "
        "float MatMul). The FP32 embedding table (47 MB) is not quantized.",
        "",
        "| recipe | size MB | onnx vs torch | onnx vs fp32 | torch vs fp32 | onnx cos | torch cos |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in minilm:
        if r["recipe"] == "fp32":
            lines.append(f"| fp32 | {r['size_mb']:.1f} | | | | 1 | 1 |")
            continue
        lines.append(
            f"| {r['recipe']} | {r['size_mb']:.1f} | {r['onnx_vs_torch']:.1e} | {r['onnx_vs_fp32']:.4f} | "
            f"{r['torch_vs_fp32']:.4f} | {r['onnx_cos']:.5f} | {r['torch_cos']:.5f} |"
        )
    lines += [
        "",
        f"One linear x [rows, 1536] @ W [1536, 1536] at opset 21, ONNX Runtime CPU, 1 thread, median of "
        f"{args.runs} runs (`session.qdq_matmulnbits_accuracy_level` 1). The machine was shared with "
        "other jobs: compare within a column, not absolute times. `auto` is the qpass function op, "
        "`dequantize_linear` the standard op.",
        "",
        "| form | size MB | session ms | rows 1 ms | rows 512 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in linear:
        lines.append(
            f"| {r['form']} | {r['size_mb']:.2f} | {r['init_ms']:.0f} | {r['ms_rows1']:.2f} | {r['ms_rows512']:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_block_formats.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "onnx_block_formats.json").write_text(
        json.dumps({"minilm": minilm, "linear": linear}, indent=2)
    )


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/qpass_onnx_block_formats"))
    p.add_argument("--skip-minilm", action="store_true", help="re-time the linear only, keep MiniLM rows")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    linear = linear_rows(args.runs)
    if args.skip_minilm:  # keep the MiniLM rows of the last full run
        prev = RESULTS / "onnx_block_formats.json"
        minilm = json.loads(prev.read_text())["minilm"] if prev.exists() else []
    else:
        minilm = minilm_rows(args.work, args.calib, args.eval)
    write(minilm, linear, args)


if __name__ == "__main__":
    main()
