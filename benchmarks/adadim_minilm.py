"""AdaDim on MiniLM: weight groups along the input channels (usual), along the output rows, or
chosen per layer by the calibrated output error (`weights.group_axis: auto`).

Weight-only RTN, INT4 and INT3 in groups of 128, torch target (reference path for the
output-row groups), 16 calibration sentences (X^T X for auto), held-out sentence-embedding
cosine against FP32 (`zoo.embedding_agreement`). The embedding table stays FP.

Run: python benchmarks/adadim_minilm.py  -> benchmarks/results/adadim_minilm.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

import qpass
from qpass import zoo

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", args.calib), batch_size=16, max_len=64)
    evals = zoo.minilm_batches(tok, zoo.sentences("eval", args.eval), batch_size=32, max_len=64)
    calib_t = zoo.torch_batches(calib)
    ref = zoo.embed_batches(embedder, evals)
    rows = []
    for fmt in ("int4", "int3"):
        for axis in ("in", "out", "auto"):
            recipe = {"weights": {"format": fmt, "group": 128, "group_axis": axis}, "target": "torch"}
            q = qpass.quantize(embedder, recipe, calib_t)
            axes = Counter(m.group_axis for m in q.modules() if type(m).__name__ == "QuantLinear")
            rows.append(
                {
                    "weights": f"{fmt} g128",
                    "group_axis": axis,
                    "layers": dict(axes),
                    **zoo.embedding_agreement(ref, zoo.embed_batches(q, evals)),
                }
            )
            print(rows[-1], flush=True)
    out = [
        "# AdaDim on MiniLM-L6 (`benchmarks/adadim_minilm.py`)",
        "",
        f"Weight-only RTN in groups of 128, torch target; {args.calib} calibration sentences, {args.eval}",
        "held-out sentences, sentence-embedding cosine vs FP32. group_axis: `in` = the usual groups of",
        "input channels per output row; `out` = groups of output rows per input column; `auto` = per",
        "layer, the lower calibrated output error tr(dW XᵀX dWᵀ)/tr(W XᵀX Wᵀ). Layers: how many took each.",
        "",
        "| weights | group_axis | mean cos | min cos | NN agree | layers in/out |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lay = f"{r['layers'].get('in', 0)}/{r['layers'].get('out', 0)}"
        out.append(
            f"| {r['weights']} | {r['group_axis']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
            f"{r['nn_agreement']:.3f} | {lay} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adadim_minilm.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "adadim_minilm.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
