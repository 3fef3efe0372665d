"""Outlier channels of the real MiniLM (ONNX) before and after `w8a8-smooth`: the numbers behind
`qpass inspect`, summarised per layer family.

For each family of linear layers (attention q/k/v, attention output, FFN up, FFN down) over the
6 blocks: the activation max/median channel ratio and kurtosis (mean over blocks) before and
after the recipe's passes, the layers with outlier channels (absmax >= 6x the median), and the
most shared outlier channels. Calibration: `zoo.sentences("calib", N)`, tokenized per batch with
the attention mask honoured.

Writes ``benchmarks/results/minilm_outliers.json`` and ``benchmarks/results/minilm_outliers.md``.

Usage::

    .venv/bin/python benchmarks/minilm_outliers.py              # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/minilm_outliers.py --n-calib 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qpass import zoo
from qpass.api import open_view
from qpass.data import onnx_batches
from qpass.recipe import get_recipe
from qpass.report.outliers import analyze

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {
    "attention q/k/v": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention output": ("attention.output.dense",),
    "FFN up (intermediate)": ("intermediate.dense",),
    "FFN down (output)": ("output.dense",),
}


def _family(label: str) -> str:
    """The first family whose suffix matches (attention.output.dense before output.dense)."""
    for name, suffixes in FAMILIES.items():
        if any(label.endswith(s) for s in suffixes):
            return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--recipe", default="w8a8-smooth")
    args = ap.parse_args()

    tok = zoo.load_minilm_tokenizer()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", args.n_calib), batch_size=16, max_len=128)
    with tempfile.TemporaryDirectory() as tmp:
        path = zoo.export_minilm_onnx(Path(tmp) / "minilm.onnx")
        view = open_view(path)
        t0 = time.perf_counter()
        report = analyze(
            view,
            onnx_batches(view.model, batches, 16),
            model="all-MiniLM-L6-v2 (ONNX)",
            samples=args.n_calib,
            recipe=get_recipe(args.recipe),
        )
        seconds = time.perf_counter() - t0

    rows = []
    for family in FAMILIES:
        layers = [layer for layer in report.layers if _family(layer.label) == family]
        before = [layer.before.act for layer in layers]
        after = [(layer.after or layer.before).act for layer in layers]
        rows.append(
            {
                "family": family,
                "layers": len(layers),
                "changed": sum(layer.changed for layer in layers),
                "ratio_before": float(np.mean([p.max_ratio for p in before])),
                "ratio_after": float(np.mean([p.max_ratio for p in after])),
                "kurtosis_before": float(np.mean([p.kurtosis for p in before])),
                "kurtosis_after": float(np.mean([p.kurtosis for p in after])),
                "with_outliers_before": sum(bool(p.outliers()) for p in before),
                "with_outliers_after": sum(bool(p.outliers()) for p in after),
            }
        )
    shared = [(s.channel, s.width, len(s.layers)) for s in report.shared("before")[:5]]
    doc = {
        "model": report.model,
        "recipe": args.recipe,
        "n_calib": args.n_calib,
        "outlier_ratio": report.ratio_threshold,
        "analysis_seconds": seconds,
        "families": rows,
        "shared_outliers_before": [{"channel": c, "width": w, "layers": n} for c, w, n in shared],
        "passes": report.passes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "minilm_outliers.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# MiniLM outlier channels before/after `{args.recipe}` ({args.n_calib} calibration sentences)",
        "",
        "Produced by `benchmarks/minilm_outliers.py`. Means over the 6 blocks; an outlier channel has",
        f"absmax >= {report.ratio_threshold:g}x the median channel of its layer's input. 'changed': the",
        "layer's activation or weight profile changed (smoothing folds the attention-output scales into",
        "the value projections' weights, so those count as changed with the same inputs).",
        "",
        "| layer family | layers | changed | max/median before | after | kurtosis before | after |"
        " with outliers before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['layers']} | {r['changed']} | {r['ratio_before']:.2f} | {r['ratio_after']:.2f} "
            f"| {r['kurtosis_before']:.1f} | {r['kurtosis_after']:.1f} | {r['with_outliers_before']} "
            f"| {r['with_outliers_after']} |"
        )
    lines += [
        "",
        "Most shared outlier channels before the passes (channel, input width, layers): "
        + ", ".join(f"{c} ({w}, {n})" for c, w, n in shared),
        "",
        f"Pass summary: `{report.passes[0].split(':')[0]}: {report.passes[0].split(': ')[1].split(':')[0]}`"
        if report.passes
        else "",
        f"Analysis time (calibrate, passes, calibrate again): {seconds:.1f} s on this machine "
        "(2 cores shared with other jobs: an upper bound).",
        "",
    ]
    (RESULTS / "minilm_outliers.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
