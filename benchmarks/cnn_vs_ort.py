"""qpass vs ONNX Runtime's own quantizers on a real CNN: EfficientNet-Lite2 (ImageNet, 260x260).

One run exports the classifier to ONNX (BatchNorm folded into the convs) and compares, side by side:

- FP32 ONNX (the reference);
- ONNX Runtime ``quantize_static`` (QDQ, per_channel=True) with each of its calibrators: MinMax,
  Entropy, Percentile, fed the same calibration images through a ``CalibrationDataReader``, on the
  output of its documented ``quant_pre_process``;
- ONNX Runtime ``quantize_dynamic`` (QInt8 weights, per channel);
- qpass ``w8a8``, ``w8a8-cle`` (cross-layer equalization + bias correction + w8a8) and ``w4a8``
  (INT4 per-channel weights, INT8 static activations).

Images: seeded crops and flips of the photos the scikit-image wheel ships (``qpass.zoo.images``);
calibration and evaluation photos are disjoint. Metrics vs FP32: top-1 agreement, top-5 overlap
(|top5 ∩ top5_fp| / 5), logit cosine (mean, min); file size; latency at batch 1 and 32 as ratios to
FP32 (ONNX Runtime CPU, intra_op_num_threads=2, warm-up, median of interleaved runs); the load
average beside the timings; the quantized op histogram of each ORT-optimized graph.

Writes ``benchmarks/results/cnn_vs_ort.json`` and ``.md``. Usage (about 5 min on 2 cores)::

    flock /tmp/qpass.lock .venv/bin/python -P benchmarks/cnn_vs_ort.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime.quantization as ortq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_vs_ort import (  # noqa: E402
    ListReader,
    _loadavg,
    machine,
    op_histogram,
    preprocess_for_ort,
    quant_ops,
    session,
    timed,
    working_dir,
)

import qpass  # noqa: E402
from qpass.zoo.efficientnet import export_efficientnet_onnx, load_efficientnet_lite2  # noqa: E402
from qpass.zoo.images import photo_batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
W4A8 = {
    "name": "w4a8",
    "description": "INT4 weights per output channel, INT8 static activations per tensor",
    "passes": [],
    "weights": {"format": "int4", "symmetric": True},
    "activations": {"format": "int8", "granularity": "per_tensor", "dynamic": False},
}


def logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def agreement(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    top5 = np.argsort(-y, 1)[:, :5]
    top5_ref = np.argsort(-ref, 1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5, top5_ref, strict=True)]
    return {
        "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()),
        "top5_overlap": float(np.mean(overlap)),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


def time_interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, warmup: int, runs: int):
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, {"x": x})
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    calib = photo_batch("calib", args.n_calib, seed=1).numpy()
    evals = photo_batch("eval", args.n_eval, seed=2).numpy()
    feeds = [{"x": calib[i : i + 8]} for i in range(0, len(calib), 8)]
    work = Path(tempfile.mkdtemp(prefix="cnn_vs_ort_"))
    src = work / "fp32.onnx"
    export_efficientnet_onnx(load_efficientnet_lite2(copy_model=False), str(src))
    pre = preprocess_for_ort(src, work / "pre.onnx")
    ort_src = Path(pre["input"])
    models: dict[str, dict] = {"fp32": {"path": src, "quant_s": 0.0}}
    for name, recipe in (("qpass w8a8", "w8a8"), ("qpass w8a8-cle", "w8a8-cle"), ("qpass w4a8", W4A8)):
        dst = work / f"{name.split()[1]}.onnx"
        result, secs = timed(lambda recipe=recipe, dst=dst: qpass.quantize_file(src, dst, recipe, feeds))
        models[name] = {"path": dst, "quant_s": secs, "report": result.report.summary()}
    methods = {
        "MinMax": ortq.CalibrationMethod.MinMax,
        "Entropy": ortq.CalibrationMethod.Entropy,
        "Percentile": ortq.CalibrationMethod.Percentile,
    }
    with working_dir(work):
        for label, method in methods.items():
            dst = work / f"ort_static_{label}.onnx"
            go = lambda dst=dst, method=method: ortq.quantize_static(  # noqa: E731
                str(ort_src), str(dst), ListReader(feeds), quant_format=ortq.QuantFormat.QDQ,
                per_channel=True, calibrate_method=method,
            )
            try:
                _, secs = timed(go)
                models[f"ORT static {label}"] = {"path": dst, "quant_s": secs}
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
                models[f"ORT static {label}"] = {"error": f"{type(exc).__name__}: {exc}"}
        dst = work / "ort_dynamic.onnx"
        go = lambda: ortq.quantize_dynamic(  # noqa: E731
            str(ort_src), str(dst), weight_type=ortq.QuantType.QInt8, per_channel=True
        )
        try:
            _, secs = timed(go)
            models["ORT dynamic"] = {"path": dst, "quant_s": secs}
        except Exception as exc:  # noqa: BLE001
            models["ORT dynamic"] = {"error": f"{type(exc).__name__}: {exc}"}
    sessions, ref = {}, None
    for name, m in models.items():
        if "error" in m:
            continue
        opt = work / f"{name.replace(' ', '_')}.opt.onnx"
        try:
            sessions[name] = session(m["path"], opt)
        except Exception as exc:  # noqa: BLE001 - ORT refusing a model is a result too
            m["error"] = f"session: {type(exc).__name__}: {exc}"
            continue
        m["optimized_quant_ops"] = quant_ops(op_histogram(opt))
        m["size_mb"] = os.path.getsize(m["path"]) / 2**20
        y = logits(sessions[name], evals)
        ref = y if name == "fp32" else ref
        m.update(agreement(y, ref))
    load_before = _loadavg()
    lat1 = time_interleaved(sessions, evals[:1], 3, args.runs * 3)
    lat32 = time_interleaved(sessions, evals[:32], 1, args.runs)
    load_after = _loadavg()
    for name in sessions:
        models[name]["latency_b1_ms"] = lat1[name]
        models[name]["latency_b32_ms"] = lat32[name]
        models[name]["latency_b1_ratio"] = lat1[name] / lat1["fp32"]
        models[name]["latency_b32_ratio"] = lat32[name] / lat32["fp32"]
    out = {
        "machine": machine(),
        "loadavg_before_timing": load_before,
        "loadavg_after_timing": load_after,
        "n_calib": args.n_calib,
        "n_eval": args.n_eval,
        "ort_preprocess": {k: v for k, v in pre.items() if k != "input"},
        "models": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items() if kk != "report"}
                   for k, v in models.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cnn_vs_ort.json").write_text(json.dumps(out, indent=1, default=str))
    (RESULTS / "cnn_vs_ort.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    rows = [
        "# EfficientNet-Lite2: qpass vs ONNX Runtime quantizers",
        "",
        f"{out['n_calib']} calibration / {out['n_eval']} evaluation crops (disjoint photos); "
        f"{out['machine']['cpu']}, {out['machine']['intra_op_num_threads']} threads, "
        f"onnxruntime {out['machine']['onnxruntime']}, {out['machine']['date']}; "
        f"loadavg {out['loadavg_before_timing']} before timing, {out['loadavg_after_timing']} after.",
        "",
        "| model | top-1 agree | top-5 overlap | cos mean | cos min | MB | b1 ×FP32 | b32 ×FP32 | quant s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in out["models"].items():
        if "error" in m:
            rows.append(f"| {name} | failed: {m['error'][:120]} | | | | | | | |")
            continue
        rows.append(
            f"| {name} | {m['top1_agreement']:.3f} | {m['top5_overlap']:.3f} | {m['cosine_mean']:.4f} | "
            f"{m['cosine_min']:.4f} | {m['size_mb']:.1f} | {m['latency_b1_ratio']:.2f} | "
            f"{m['latency_b32_ratio']:.2f} | {m['quant_s']:.1f} |"
        )
    rows += ["", "Quantized ops in each ORT-optimized graph:", ""]
    rows += [f"- {name}: {m.get('optimized_quant_ops', {})}" for name, m in out["models"].items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
