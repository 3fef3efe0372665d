"""Why GPTQ's gain over RTN shrinks out of domain, layer by layer (issue 21, item 5).

For every linear of SmolLM2-135M (or Qwen2.5-0.5B), the float model's inputs X are collected on
three texts: the calibration split (pydoc topics), held-out pydoc topics, and the interpreter's
LICENSE prose (another domain). Each weight is quantized to INT4 g128 by RTN and by GPTQ from the
calibration Hessian under several settings (dampening, act-order / static groups, calibration
size, a Hessian mixed with its own diagonal), and the relative output error
||(W_q - W) X^T||^2 / ||W X^T||^2 is measured on each text. A setting that lowers the held-out
error but not the other domain's overfits the calibration text's second moments.

    .venv/bin/python -P benchmarks/gptq_domain.py            # SmolLM2, every 3rd block
Results: benchmarks/results/gptq_domain_<model>.md / .json, with the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_measure import load_text  # noqa: E402

from qpass import zoo  # noqa: E402
from qpass.formats import ElementType, Granularity, QuantSpec  # noqa: E402
from qpass.quant.gptq import gptq  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
# a short last group where 128 does not divide the width (576 = 4.5 x 128), as the recipes do
SPEC = QuantSpec(
    ElementType("int4"), Granularity.PER_GROUP, axis=-1, group_size=128, symmetric=True, pad_tail=True
)
BUILTIN = {"damp": 0.01, "act_order": True, "static_groups": True}
# name -> (gptq keyword arguments, fraction of the calibration rows, diagonal mix)
SETTINGS: dict[str, tuple[dict, float, float]] = {
    "damp 0.01, act-order, static groups (w4a16-gptq)": (BUILTIN, 1.0, 0.0),
    "damp 0.1": ({"damp": 0.1, "act_order": True, "static_groups": True}, 1.0, 0.0),
    "damp 1.0": ({"damp": 1.0, "act_order": True, "static_groups": True}, 1.0, 0.0),
    "no act-order": ({"damp": 0.01, "act_order": False}, 1.0, 0.0),
    "act-order, dynamic groups": ({"damp": 0.01, "act_order": True, "static_groups": False}, 1.0, 0.0),
    "a quarter of the calibration rows": ({"damp": 0.01, "act_order": True, "static_groups": True}, 0.25, 0.0),
    "H mixed 50% with its diagonal": ({"damp": 0.01, "act_order": True, "static_groups": True}, 1.0, 0.5),
}  # fmt: skip


def _inputs(model: nn.Module, rows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Every named linear's input rows [tokens, in] over `rows`, float64."""
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: got[n].append(i[0].reshape(-1, i[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        for row in rows:
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


def _err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.T
    return float(((x @ (wq - w).T) ** 2).sum() / (ref**2).sum())


def main(name: str, every: int, rows: int) -> None:
    torch.set_num_threads(2)
    model, tok = (
        zoo.load_smollm2(copy_model=False) if name == "smollm2" else zoo.load_qwen25(copy_model=False)
    )
    texts = {
        "calib": zoo.packed_token_rows(tok, "calib", 256, n_rows=rows),
        "eval": zoo.packed_token_rows(tok, "eval", 256, n_rows=8),
        "ood": zoo.packed_token_rows(tok, "ood", 256, n_rows=8),
    }
    layers = model.model.layers
    mods = dict(model.named_modules())
    blocks = [
        [f"model.layers.{i}.{sub}" for sub, mod in layers[i].named_modules() if isinstance(mod, nn.Linear)]
        for i in range(0, len(layers), every)
    ]
    names = [n for b in blocks for n in b]
    cells: dict[str, dict[str, list[float]]] = {}
    for block in blocks:  # one block's inputs at a time: bounded memory
        xs_by = {t: _inputs(model, r, block) for t, r in texts.items()}
        for lin in block:
            xs = {t: xs_by[t][lin] for t in texts}
            w = mods[lin].weight.detach().double()
            wq = {"RTN": SPEC.fake_quantize(w.float()).double()}
            for setting, (kwargs, frac, mix) in SETTINGS.items():
                xc = xs["calib"][: max(1, int(frac * len(xs["calib"])))]
                h = xc.T @ xc
                if mix:
                    h = (1 - mix) * h + mix * torch.diag(torch.diagonal(h))
                wq[setting] = gptq(w.float(), h, SPEC, **kwargs).dequantized().double()
            for setting, q in wq.items():
                for t in texts:
                    cells.setdefault(setting, {}).setdefault(t, []).append(_err(w, q, xs[t]))
            first = list(wq)[:2]
            print(
                f"{lin}: "
                + ", ".join(
                    f"{s[:10]} eval {cells[s]['eval'][-1]:.2e} ood {cells[s]['ood'][-1]:.2e}" for s in first
                ),
                flush=True,
            )
        del xs_by
    _write(name, every, rows, names, cells)


def _write(name: str, every: int, rows: int, names: list[str], cells: dict) -> None:
    rtn = cells["RTN"]
    summary = {
        s: {t: statistics.geometric_mean(v[t]) for t in v}
        | {
            f"{t}_vs_rtn": statistics.geometric_mean([a / b for a, b in zip(v[t], rtn[t], strict=True)])
            for t in v
        }
        for s, v in cells.items()
    }
    meta = {"model": name, "linears": len(names), "every": every, "calib_rows": rows, "load": load_text()}
    OUT.mkdir(exist_ok=True)
    (OUT / f"gptq_domain_{name}.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    lines = [
        f"# `benchmarks/gptq_domain.py {name}`",
        "",
        f"{os.cpu_count()} CPU cores, 2 threads, load {meta['load']}. INT4 g128 symmetric weights of "
        f"{len(names)} linears (every {every}th block), calibration Hessian from {rows} x 256 tokens of "
        "the 'calib' split. Relative output error on the float model's inputs, geometric mean over "
        "the linears; 'x RTN' = geometric mean of the per-linear ratio to RTN's error on the same text.",
        "",
        "| weights | calibration text | held-out pydoc | LICENSE prose (other domain) |",
        "|---|---:|---:|---:|",
    ]
    for s, v in summary.items():
        lines.append(
            f"| {s} | "
            + " | ".join(f"{v[t]:.2e} ({v[f'{t}_vs_rtn']:.2f}x RTN)" for t in ("calib", "eval", "ood"))
            + " |"
        )
    (OUT / f"gptq_domain_{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", choices=["smollm2", "qwen25"])
    ap.add_argument("--every", type=int, default=3, help="every n-th decoder block")
    ap.add_argument("--calib-rows", type=int, default=32)
    a = ap.parse_args()
    main(a.model, a.every, a.calib_rows)
