"""Low-bit LLM accuracy in one table (issue 21): relative perplexity vs FP32 for each bit setting,
without rotation (GPTQ only) and in the QuaRot layout, measured on text of the calibration's own
domain and on text of another domain, plus quantize time.

Each cell goes through `qpass.quantize(model, recipe, calibration=text, tokenizer=tok)` on the
stock transformers model (the KV rows then use the recipe's quantized cache), calibrated on
packed rows of the 'calib' split (pydoc topics), and is scored teacher-forced through the model's
own cache (`lm_measure.ppl_through_cache`) on:
- 'eval': held-out pydoc topics (the calibration's domain, disjoint rows);
- 'ood': the interpreter's LICENSE.txt prose (another kind of English; `zoo.text_corpus("ood")`).

Usage (2 threads; one model per run)::

    .venv/bin/python -P benchmarks/llm_lowbit.py smollm2
    .venv/bin/python -P benchmarks/llm_lowbit.py qwen25 --only "W4A8/quarot" "W4A16 g128/gptq"
Results: benchmarks/results/llm_lowbit_<model>.md and .json, the machine load beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_measure import load_text, ppl_through_cache  # noqa: E402

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
CALIB_ROWS, CALIB_LEN, EVAL_ROWS, EVAL_LEN = 32, 256, 8, 256
QUAROT = [{"fuse_norms": {}}, {"rotate": {"kind": "hadamard", "layout": "residual", "online": True}}]
GPTQ = {"algo": "gptq", "act_order": True}
GPTQ_G128 = {"algo": "gptq", "act_order": True, "group": 128, "static_groups": True}
KV4 = {"format": "int4", "rotate": "hadamard"}


def _recipe(name: str, passes: list, weights: dict | None, acts: str | None, kv: dict | None = None) -> dict:
    return {
        "name": name,
        "passes": passes,
        "weights": None if weights is None else {"symmetric": True, **weights},
        "activations": None
        if acts is None
        else {"format": acts, "granularity": "per_token", "dynamic": True},
        **({"kv_cache": kv} if kv else {}),
    }


# row -> column -> recipe (a built-in's name, or a dict); the QuaRot column holds the built-ins
W4_GPTQ, W4_GPTQ_G128 = {"format": "int4", **GPTQ}, {"format": "int4", **GPTQ_G128}


def _kept(builtin: str) -> dict:
    """A built-in QuaRot recipe whose fuse_norms keeps the gammas it measures as protective."""
    data = qpass.get_recipe(builtin).to_dict()
    data["passes"] = [
        {"fuse_norms": {"keep_gamma": "auto"}} if "fuse_norms" in p else p for p in data["passes"]
    ]
    return {**data, "name": f"{builtin} keep_gamma=auto"}


TABLE: dict[str, dict[str, str | dict]] = {
    "W8A8": {"rtn": "w8a8-dynamic", "quarot": _recipe("w8a8 quarot", QUAROT, {"format": "int8"}, "int8")},
    "W4A16 g128": {
        "rtn": "w4a16",
        "gptq": "w4a16-gptq",
        "quarot": "w4a16-rotate-gptq",
        "quarot_kept": _kept("w4a16-rotate-gptq"),
    },
    "W4A16 g128, head float": {
        "gptq": {
            **qpass.get_recipe("w4a16-gptq").to_dict(),
            "name": "w4a16-gptq head-fp",
            "exclude": ["output_head"],
        }
    },
    "W4A16 g32 asym": {
        "rtn": _recipe("w4a16 g32 asym", [], {"format": "int4", "group": 32, "symmetric": False}, None)
    },
    "W4A16 g32 asym, float zero points, head float": {
        "rtn": {
            **_recipe(
                "w4a16 g32 asym fzp head-fp",
                [],
                {"format": "int4", "group": 32, "symmetric": False, "float_zero_point": True},
                None,
            ),
            "exclude": ["output_head"],
        }
    },
    "W4A16 g32 asym, float zero points": {
        "rtn": _recipe(
            "w4a16 g32 asym fzp",
            [],
            {"format": "int4", "group": 32, "symmetric": False, "float_zero_point": True},
            None,
        )
    },
    "W4A8": {
        "gptq": _recipe("w4a8 gptq", [], W4_GPTQ, "int8"),
        "quarot": "w4a8-rotate",
        "quarot_kept": _kept("w4a8-rotate"),
    },
    "W4A8 g128": {"gptq": _recipe("w4a8 gptq g128", [], W4_GPTQ_G128, "int8"), "quarot": "w4a8-rotate-g128"},
    "W4A4": {
        "gptq": _recipe("w4a4 gptq", [], W4_GPTQ, "int4"),
        "quarot": "w4a4-rotate",
        "quarot_kept": _kept("w4a4-rotate"),
    },
    "W4A4KV4": {
        "gptq": _recipe("w4a4kv4 gptq", [], W4_GPTQ, "int4", KV4),
        "quarot": "w4a4kv4-rotate",
        "quarot_kept": _kept("w4a4kv4-rotate"),
    },
}
COLUMNS = {
    "rtn": "RTN",
    "gptq": "GPTQ only",
    "quarot": "QuaRot layout",
    "quarot_kept": "QuaRot, protective gammas kept",
}


def load(name: str):
    model, tok = (
        zoo.load_smollm2(copy_model=False) if name == "smollm2" else zoo.load_qwen25(copy_model=False)
    )
    model.config.use_cache = True  # the zoo's SmolLM2 loader turns it off for graph capture
    return model, tok


def main(name: str, only: list[str] | None) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load(name)
    splits = {s: zoo.packed_token_rows(tok, s, EVAL_LEN, n_rows=EVAL_ROWS) for s in ("eval", "ood")}
    fp = {s: ppl_through_cache(model, rows) for s, rows in splits.items()}
    print(f"{name} FP32 eval {fp['eval']:.3f} ood {fp['ood']:.3f} load {load_text()}", flush=True)
    calib = zoo.text_corpus("calib")
    cells = []
    for row, columns in TABLE.items():
        for col, recipe in columns.items():
            key = f"{row}/{col}"
            if only and key not in only:
                continue
            t = time.perf_counter()
            q = qpass.quantize(
                model, recipe, calibration=calib, tokenizer=tok, seq_len=CALIB_LEN, max_rows=CALIB_ROWS
            )
            qtime = time.perf_counter() - t
            ppl = {s: ppl_through_cache(q, rows) for s, rows in splits.items()}
            cell = {
                "row": row,
                "column": col,
                "recipe": recipe if isinstance(recipe, str) else recipe["name"],
                "quantize_s": round(qtime, 1),
                **{f"ppl_{s}": round(v, 4) for s, v in ppl.items()},
                **{f"vs_fp32_{s}_pct": round(100 * (ppl[s] / fp[s] - 1), 2) for s in ppl},
                "load": load_text(),
            }
            cells.append(cell)
            _write(name, only, fp, list(cells))  # after every cell: a later crash keeps what was measured
            print(
                f"{name} {key:28s} eval {cell['vs_fp32_eval_pct']:+8.1f}%  ood {cell['vs_fp32_ood_pct']:+8.1f}%  "
                f"quantize {qtime:.0f}s  load {cell['load']}",
                flush=True,
            )
            del q


def _merged(path: Path, fp: dict, cells: list[dict]) -> list[dict]:
    """`--only` updates its cells inside the model's table (same FP32 figures, else refused)."""
    if not path.exists():
        return cells
    old = json.loads(path.read_text())
    if any(abs(old["meta"]["fp32"][s] / fp[s] - 1) > 1e-4 for s in fp):
        sys.exit(f"{path}: its FP32 perplexities {old['meta']['fp32']} differ from this run's {fp}")
    new_keys = {(c["row"], c["column"]) for c in cells}
    known = {(r, c) for r, cols in TABLE.items() for c in cols}  # a cell renamed since is dropped
    kept = [c for c in old["cells"] if (c["row"], c["column"]) in known - new_keys]
    return kept + cells


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(name: str, only: list[str] | None, fp: dict, cells: list[dict]) -> None:
    stem = f"llm_lowbit_{name}"
    meta = {
        "model": name,
        "torch": torch.__version__,
        "threads": 2,
        "cpus": os.cpu_count(),
        "calibration": f"{CALIB_ROWS} packed rows x {CALIB_LEN} tokens, 'calib' split (pydoc topics)",
        "evaluation": f"{EVAL_ROWS} x {EVAL_LEN} tokens per split, teacher-forced through the model's cache",
        "fp32": fp,
        "load_after": load_text(),
    }
    OUT.mkdir(exist_ok=True)
    if only:
        cells = _merged(OUT / f"{stem}.json", fp, cells)
    rows, columns = list(TABLE), list(COLUMNS)
    cells.sort(key=lambda c: (rows.index(c["row"]), columns.index(c["column"])))
    _atomic_write(OUT / f"{stem}.json", json.dumps({"meta": meta, "cells": cells}, indent=1) + "\n")
    by = {(c["row"], c["column"]): c for c in cells}
    head = " | ".join(f"{COLUMNS[c]}: in-domain / other domain (quantize s)" for c in COLUMNS)
    lines = [
        f"# `benchmarks/llm_lowbit.py {name}`",
        "",
        f"{meta['cpus']} CPU cores, no GPU, torch {meta['torch']}, 2 threads. Calibration: {meta['calibration']}. "
        f"Perplexity: {meta['evaluation']}; in-domain = held-out pydoc topics, other domain = the "
        f"interpreter's LICENSE.txt prose. FP32: {fp['eval']:.3f} in-domain, {fp['ood']:.3f} other domain. "
        f"Load average after the last run: {meta['load_after']} (each cell's own in the .json; cells "
        "rerun with `--only` replace theirs).",
        "",
        f"| setting | {head} |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row in TABLE:
        vals = []
        for col in COLUMNS:
            c = by.get((row, col))
            vals.append(
                "-"
                if c is None
                else f"{c['vs_fp32_eval_pct']:+.1f}% / {c['vs_fp32_ood_pct']:+.1f}% ({c['quantize_s']:.0f})"
            )
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    lines += ["", "Recipes: " + "; ".join(f"{c['row']}/{c['column']} = `{c['recipe']}`" for c in cells) + "."]
    _atomic_write(OUT / f"{stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", choices=["smollm2", "qwen25"])
    ap.add_argument("--only", nargs="*", help="cells as ROW/COLUMN, e.g. 'W4A8/quarot'")
    a = ap.parse_args()
    main(a.model, a.only)
