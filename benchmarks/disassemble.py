"""QLLM channel disassembly: activation quantization error of the split linear inputs.

For every site the `disassemble` pass applies, the linear's input x (before) and the widened
x' (after) are observed on a held-out batch, fake-quantized symmetric INT8 / INT4 per token and
per tensor, and multiplied by the consumer's weights (W before, the column-repeated W' after).
The table gives the relative output error ||Q(x) W^T - x W^T|| / ||x W^T|| without and with
the pass (the FP outputs agree: the pass is verified exact), and the channel growth. A
whole-model row quantizes the model W8A8 (per-tensor static and per-token activations) with
and without the pass.

Models: the synthetic TinyLlama (SwiGLU: down_proj inputs are split) and TinyBert (ReLU FFN:
fc_out input split; GELU fc2 inputs skipped) with 4 massive channels of 512
(`tests/models.massive_channel_outliers`), and MiniLM, where no site qualifies (LayerNorm,
GELU or attention produce every linear input) and the skip reasons are listed.

Run: python benchmarks/disassemble.py  -> benchmarks/results/disassemble.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import TinyBert, TinyLlama, bert_inputs, llama_inputs, massive_channel_outliers  # noqa: E402

import qpass  # noqa: E402
from qpass.graph.fx import FxGraphView  # noqa: E402
from qpass.graph.fx_capture import capture, clone_graph_module  # noqa: E402
from qpass.graph.regions import find_sites  # noqa: E402
from qpass.pass_base import PassContext  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402
from qpass.passes.disassemble import Disassemble, DisassembleConfig  # noqa: E402
from qpass.quant.qlinear import canonical_weight  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = (
    ("int8", 8, "per_token"),
    ("int8", 8, "per_tensor"),
    ("int4", 4, "per_token"),
    ("int4", 4, "per_tensor"),
)


def fake_int(x: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """Symmetric round-to-nearest with the absmax scale per token (row) or per tensor."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True) if granularity == "per_token" else x.abs().amax()
    scale = amax.clamp_min(1e-12) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


def _sites(view) -> dict[str, tuple]:
    sites, _ = find_sites(view)
    return {
        s.label: (
            s.value,
            [canonical_weight(view.read(k.weight.const), k.weight).to(torch.float64) for k in s.sinks],
        )
        for s in sites
    }


def output_error(x: torch.Tensor, weights: list[torch.Tensor], bits: int, granularity: str) -> float:
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    q = fake_int(x, bits, granularity)
    num = sum(float(((q - x) @ w.T).norm() ** 2) for w in weights)
    den = sum(float((x @ w.T).norm() ** 2) for w in weights)
    return (num / den) ** 0.5


def site_rows(name: str, model, batches, cfg: DisassembleConfig) -> tuple[list[dict], list[str]]:
    view = FxGraphView(clone_graph_module(capture(model, batches[0])))
    before_sites = _sites(view)
    x_before = view.observe([v for v, _ in before_sites.values()], batches[-1])
    result = run_pass(view, Disassemble(cfg), batches[:-1], PassContext(), verify=True)
    applied = {n.site: n.detail for n in result.plan.applied_sites}
    after_sites = _sites(view)
    labels = [lbl for lbl in applied if lbl in before_sites]
    x_after = view.observe([before_sites[lbl][0] for lbl in labels], batches[-1]) if labels else {}
    rows = []
    for lbl in labels:
        value, w_b = before_sites[lbl]
        x_b, x_a, w_a = x_before[value.name], x_after[value.name], after_sites[lbl][1]
        row = {
            "model": name,
            "site": lbl,
            "max_extra": cfg.max_extra,
            "width": (x_b.shape[-1], x_a.shape[-1]),
        }
        for fmt, bits, gran in MODES:
            row[f"{fmt} {gran}"] = (output_error(x_b, w_b, bits, gran), output_error(x_a, w_a, bits, gran))
        row["detail"] = applied[lbl]
        rows.append(row)
        print(name, lbl, {k: v for k, v in row.items() if k.startswith("int")}, flush=True)
    skipped = [n.detail for n in result.plan.skipped_sites]
    return rows, skipped


def model_rows(name: str, model, batches, cfg: DisassembleConfig) -> list[dict]:
    """Whole model W8A8: relative output error vs FP on the held-out batch, without / with the pass."""
    x = batches[-1]
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        ref = model(*args)
    out = []
    for gran, dynamic in (("per_tensor", False), ("per_token", True)):
        errs = []
        for passes in ([], [{"disassemble": {"max_extra": cfg.max_extra}}]):
            recipe = {
                "passes": passes,
                "weights": {"format": "int8"},
                "activations": {"format": "int8", "granularity": gran, "dynamic": dynamic},
                "target": "torch",
            }
            q = qpass.quantize(model, recipe, batches[:-1])
            with torch.no_grad():
                errs.append(float((q(*args) - ref).norm() / ref.norm()))
        out.append({"model": name, "activations": f"int8 {gran}", "max_extra": cfg.max_extra, "errors": errs})
        print(out[-1], flush=True)
    return out


def synthetic() -> list[tuple[str, torch.nn.Module, list]]:
    out = []
    lb = [llama_inputs(dim=256, seed=i) for i in range(4)]
    bb = [tuple(bert_inputs(dim=256, seed=i).values()) for i in range(4)]
    for f in (20.0, 100.0):
        torch.manual_seed(0)
        llama = massive_channel_outliers(TinyLlama(dim=256, hidden=512, heads=2, kv_heads=2), factor=f)
        torch.manual_seed(0)
        bert = massive_channel_outliers(TinyBert(dim=256, hidden=512, heads=2), factor=f)
        out += [(f"TinyLlama, 4 ch x{f:g}", llama, lb), (f"TinyBert, 4 ch x{f:g}", bert, bb)]
    return out


def minilm_skips() -> list[str]:
    from qpass import zoo

    embedder, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=8, max_len=32)
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    _, skipped = site_rows("MiniLM-L6", embedder, batches, DisassembleConfig())
    return skipped


def to_markdown(rows, whole, minilm) -> str:
    out = [
        "# QLLM channel disassembly (`benchmarks/disassemble.py`)",
        "",
        "Relative output error ||Q(x) W^T - x W^T|| / ||x W^T|| of each split linear input on a held-out",
        "batch, symmetric activation quantization, without -> with the pass (FP outputs verified equal,",
        "<= 1e-4). Width: input channels before -> after (no assembly: QLLM's merge is approximate).",
        "",
        "| model | site | max_extra | width | INT8 per token | INT8 per tensor | INT4 per token | INT4 per tensor |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{f} {g}'][0]:.4f} -> {r[f'{f} {g}'][1]:.4f}" for f, _, g in MODES]
        out.append(
            f"| {r['model']} | {r['site'].split(' -> ')[1]} | {r['max_extra']:g} | "
            f"{r['width'][0]} -> {r['width'][1]} | " + " | ".join(cells) + " |"
        )
    out += [
        "",
        "## Whole model, W8A8 (INT8 per-channel weights), relative output error vs FP32",
        "",
        "| model | activations | max_extra | without | with disassemble |",
        "|---|---|---:|---:|---:|",
    ]
    for r in whole:
        out.append(
            f"| {r['model']} | {r['activations']} | {r['max_extra']:g} | {r['errors'][0]:.4f} | {r['errors'][1]:.4f} |"
        )
    if minilm is not None:
        out += ["", "## MiniLM-L6: no site qualifies", "", "| reason | sites |", "|---|---:|"]
        counts = Counter(re.sub(r"'[^']*'", "'…'", d) for d in minilm)
        out += [f"| {k} | {v} |" for k, v in counts.most_common()]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, whole = [], []
    for name, model, batches in synthetic():
        for extra in (0.1, 0.25):
            cfg = DisassembleConfig(max_extra=extra)
            rows += site_rows(name, model, batches, cfg)[0]
            whole += model_rows(name, model, batches, cfg)
    minilm = None if args.no_minilm else minilm_skips()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "disassemble.json").write_text(
        json.dumps({"sites": rows, "whole_model": whole, "minilm_skipped": minilm}, indent=1)
    )
    text = to_markdown(rows, whole, minilm)
    (RESULTS / "disassemble.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
