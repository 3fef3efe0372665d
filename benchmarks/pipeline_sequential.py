"""Sequential (block-wise, on quantized inputs) vs one-shot calibration: held-out perplexity,
quantize time and peak RSS, per recipe, on SmolLM2-135M (and Qwen2.5-Coder-0.5B with --model qwen25).

Each row runs in its own process, so its peak RSS (ru_maxrss) is its own: the model load plus
the quantize stage and the evaluation. The text is the one of `benchmarks/smollm2_ppl.py`
(`zoo.packed_token_rows`, calibration and evaluation from disjoint splits, full 256-token rows)
and the perplexity `zoo.perplexity`. The machine load (/proc/loadavg) is recorded before and
after each row: other developers share these 2 cores.

    .venv/bin/python -P benchmarks/pipeline_sequential.py                  # SmolLM2, every row
    .venv/bin/python -P benchmarks/pipeline_sequential.py --model qwen25 --only w4a16-gptq
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"


def _rotate_gptq(acts: str) -> dict:
    """The built-in w4a8/w4a4-rotate (QuaRot layout) with GPTQ weights instead of RTN: with RTN
    weights and dynamic activations nothing is calibrated, so sequential changes nothing.
    """
    from qpass.recipe import get_recipe

    data = get_recipe(f"w4a{acts}-rotate").to_dict()
    data["weights"] = {**data["weights"], "algo": "gptq"}
    data["name"] = f"w4a{acts}-rotate-gptq"
    return data


RECIPES = {
    "w4a16-gptq": lambda: "w4a16-gptq",
    "w4a8-rotate-gptq": lambda: _rotate_gptq("8"),
    "w4a4-rotate-gptq": lambda: _rotate_gptq("4"),
}
MODES = {  # the recipe's `calibration:` section per mode
    "one-shot": {"sequential": False},
    "sequential": {"sequential": True},
    "sequential+float-outputs": {"sequential": True, "objective": "float_outputs"},
}


NOTES = [
    "Notes:",
    "",
    "- `w4a8-rotate-gptq` / `w4a4-rotate-gptq` are the built-in `w4a8-rotate` / `w4a4-rotate` with",
    "  `weights.algo: gptq`. The built-ins use RTN weights and dynamic activations: nothing is",
    "  calibrated, so `sequential` gives the one-shot model by construction (tested with RTN weights).",
    "- `sequential+float-outputs` (`objective: float_outputs`, each layer fitted to the float model's",
    "  outputs, GPTAQ-style) overfits at this calibration size: the fit has one free weight per input",
    "  channel and output, with 4096 calibration tokens against 576-1536 inputs per layer.",
    "- Code `784327d+dirty`: the first commit's pipeline (its `layer` objective is unchanged since);",
    "  its sequential rows kept each batch's logits after the tail (fixed in c839835: peak RSS of",
    "  those rows may be high by up to 4 x 4 x 256 x 49152 x 4 B = 0.8 GB, it did not set the peak here).",
]


def _load(model: str):
    from qpass import zoo

    return zoo.load_smollm2(copy_model=False) if model == "smollm2" else zoo.load_qwen25(copy_model=False)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_row(model_name: str, recipe_name: str, mode: str, calib_rows: int, eval_rows: int) -> dict:
    """One row in this process: load, (quantize), evaluate; returns the measured numbers."""
    import qpass
    from qpass import zoo
    from qpass.recipe import get_recipe

    load0 = _loadavg()
    model, tok = _load(model_name)
    calib = zoo.packed_token_rows(tok, "calib", 256, calib_rows)
    held_out = zoo.packed_token_rows(tok, "eval", 256, eval_rows)
    batches = [calib[i : i + 4] for i in range(0, len(calib), 4)]
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quantize_s = 0.0
    if recipe_name != "fp32":
        data = get_recipe(RECIPES[recipe_name]()).to_dict()
        data["calibration"] = MODES[mode]
        t = time.perf_counter()
        model = qpass.quantize(model, data, batches, inplace=True)
        quantize_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = zoo.perplexity(model, held_out)
    return {
        "model": model_name,
        "recipe": recipe_name,
        "mode": mode,
        "perplexity": ppl,
        "quantize_s": quantize_s,
        "eval_s": time.perf_counter() - t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        "commit": _commit(),
    }


def _commit() -> str:
    """The code the row ran (a dirty tree is marked): rows of earlier runs are kept in the table."""
    git = ["git", "-C", str(Path(__file__).parent)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "qpass"], capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=("smollm2", "qwen25"), default="smollm2")
    ap.add_argument("--calib-rows", type=int, default=16)
    ap.add_argument("--rows", type=int, default=32, help="evaluation rows of 256 tokens")
    ap.add_argument("--only", nargs="*", help="these recipes only (fp32 always runs)")
    ap.add_argument("--modes", nargs="*", choices=sorted(MODES), default=list(MODES))
    ap.add_argument("--row", nargs=2, metavar=("RECIPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:  # a child: one row, printed as JSON
        print(json.dumps(run_row(args.model, args.row[0], args.row[1], args.calib_rows, args.rows)))
        return
    rows = _previous()
    todo = [("fp32", "-")] + [(r, m) for r in RECIPES if not args.only or r in args.only for m in args.modes]
    for recipe, mode in todo:
        cmd = [sys.executable, "-P", __file__, "--model", args.model, "--calib-rows", str(args.calib_rows)]
        cmd += ["--rows", str(args.rows), "--row", recipe, mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{recipe} {mode}: failed ({done.returncode})\n{done.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        key = (args.model, recipe, mode)
        rows = [r for r in rows if (r["model"], r["recipe"], r["mode"]) != key] + [row]
        print(
            f"{args.model} {recipe:18s} {mode:10s} ppl {row['perplexity']:9.3f} quantize {row['quantize_s']:6.1f}s "
            f"peak {row['peak_rss_mib']:6.0f} MiB load {row['loadavg_before']}",
            flush=True,
        )
        _write(args, rows)


def _previous() -> list[dict]:
    """Rows already measured (the other model, other recipes): kept, the rerun ones replaced."""
    path = OUT / "pipeline_sequential.json"
    return json.loads(path.read_text())["results"] if path.exists() else []


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    meta = {
        "eval": f"{args.rows} rows x 256 tokens of zoo.packed_token_rows('eval')",
        "calibration": f"{args.calib_rows} rows x 256 tokens of zoo.packed_token_rows('calib'), batches of 4",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU, "
        "2 cores shared with other developers",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "pipeline_sequential.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# Sequential vs one-shot calibration (torch path, `calibration.sequential`)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "- peak RSS: the row's own process (model load + quantize + evaluation)",
        "",
        "| model | recipe | calibration | perplexity | vs FP32 | quantize s | peak RSS MiB | load before / after "
        "| code |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    order = {name: i for i, name in enumerate(["fp32", *RECIPES])}
    modes = {name: i for i, name in enumerate(["-", *MODES])}
    rows = sorted(rows, key=lambda r: (r["model"], order.get(r["recipe"], 99), modes.get(r["mode"], 99)))
    for r in rows:
        fp = next((f["perplexity"] for f in rows if f["model"] == r["model"] and f["recipe"] == "fp32"), None)
        vs = f"{100 * (r['perplexity'] / fp - 1):+.1f}%" if fp else "?"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['mode']} | {r['perplexity']:.3f} | {vs} "
            f"| {r['quantize_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['loadavg_before']} / "
            f"{r.get('loadavg_after', '?')} | {r.get('commit', '?')} |"
        )
    (OUT / "pipeline_sequential.md").write_text("\n".join([*lines, "", *NOTES, ""]))


if __name__ == "__main__":
    main()
