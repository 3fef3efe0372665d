"""Equivalent shift/scale transforms before W8A8 static (per-tensor) quantization: what they buy.

Two settings, one run:
- the synthetic outlier models of the tests (TinyLlama: RMSNorm/SwiGLU/GQA; TinyBert: post-LN
  plus a pre-LN block), torch path: relative output error vs FP32 on held-out batches;
- the real MiniLM sentence embedder, ONNX path (QDQ in stock onnxruntime): mean/min cosine of
  held-out sentence embeddings vs FP32 (calibration and evaluation sentences are disjoint).

Recipes: w8a8 (no pass), w8a8-smooth (SmoothQuant+, alpha searched), w8a8-os+ (OS+ shift and
threshold scaling), w8a8-outliertune (symmetrize + equalised ranges).

Writes benchmarks/results/shift_transforms.md and .json.

    .venv/bin/python benchmarks/shift_transforms.py [--n-calib 64 --n-eval 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import qpass
from qpass import zoo
from qpass.recipe import get_recipe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from models import TinyBert, TinyLlama, bert_inputs, inject_outliers, llama_inputs  # noqa: E402

RECIPES = ["w8a8", "w8a8-smooth", "w8a8-os+", "w8a8-outliertune"]


def _torch_recipe(name: str) -> dict:
    r = get_recipe(name).to_dict()
    r["target"] = "torch"
    return r


def synthetic() -> list[dict]:
    rows = []
    for label, build, inputs in (
        ("TinyLlama (outliers)", TinyLlama, llama_inputs),
        ("TinyBert (outliers)", TinyBert, bert_inputs),
    ):
        torch.manual_seed(0)
        model = inject_outliers(build()).eval()
        batches = [inputs(seed=i) for i in range(8)]
        calib, held = batches[:4], batches[4:]

        def args(b):
            return tuple(b.values()) if isinstance(b, dict) else (b,)

        with torch.no_grad():
            refs = [model(*args(b)) for b in held]
        for name in RECIPES:
            for quant in ("W8A8", "A8 only"):
                recipe = _torch_recipe(name)
                if quant == "A8 only":  # weights FP: the activation side is what the passes fix
                    recipe["weights"] = None
                q = qpass.quantize(model, recipe, calib)
                with torch.no_grad():
                    errs = [
                        float((q(*args(b)) - r).norm() / r.norm()) for b, r in zip(held, refs, strict=True)
                    ]
                rows.append(
                    {"model": label, "recipe": name, "quant": quant, "rel_error": float(np.mean(errs))}
                )
    return rows


def _embed(path: str, batches: list[dict]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, b)[0] for b in batches])


def minilm(n_calib: int, n_eval: int) -> list[dict]:
    embedder, tok = zoo.load_minilm_embedder()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = zoo.export_minilm_onnx(Path(tmp) / "minilm.onnx", embedder=embedder, tokenizer=tok)
        calib = zoo.minilm_batches(tok, zoo.sentences("calib", n_calib), batch_size=16)
        held = zoo.minilm_batches(tok, zoo.sentences("eval", n_eval), batch_size=32)
        fp = _embed(str(fp_path), held)
        for name in RECIPES:
            t0 = time.perf_counter()
            q = qpass.quantize(str(fp_path), name, calib)
            secs = time.perf_counter() - t0
            q_path = Path(tmp) / f"{name}.onnx"
            q_path.write_bytes(q.SerializeToString())
            agree = zoo.embedding_agreement(fp, _embed(str(q_path), held))
            rows.append({"recipe": name, **agree, "quantize_s": secs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=247, help="held-out sentences (the eval split has 247)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    syn = synthetic()
    real = minilm(args.n_calib, args.n_eval)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, CPU, 2 threads",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "n_calib": args.n_calib,
        "n_eval": args.n_eval,
    }
    (out / "shift_transforms.json").write_text(
        json.dumps({"meta": meta, "synthetic": syn, "minilm": real}, indent=2)
    )
    lines = [
        "# Shift/scale transforms before W8A8 static quantization",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "## Synthetic outlier models (torch path), relative output error vs FP32, held-out batches",
        "",
        "| model | recipe | quantized | rel. error |",
        "|---|---|---|---:|",
        *(f"| {r['model']} | {r['recipe']} | {r['quant']} | {r['rel_error']:.4f} |" for r in syn),
        "",
        f"## MiniLM sentence embeddings (ONNX QDQ, stock onnxruntime), {args.n_eval} held-out sentences",
        "",
        "| recipe | mean cos | min cos | NN agree | quantize s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['recipe']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['nn_agreement']:.3f} | "
            f"{r['quantize_s']:.1f} |"
            for r in real
        ),
        "",
    ]
    (out / "shift_transforms.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
