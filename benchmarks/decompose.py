"""LLM.int8 decomposition (`int8_decompose`) vs plain per-token W8A8: relative output error vs FP32.

Three settings, one run:
- synthetic LLaMA-like models (tests/models.py) on torch and ONNX (stock onnxruntime):
  * "massive residual channels": two residual-stream channels 30x larger than the rest (as the
    embedding of real LLMs emits them), the linears reading the stream have small weights there;
    dim 256, hidden 512, 2 blocks. The norm outputs carry those channels at |x| > 6;
  * "injected outliers" (the tests' fixture, dim 64): RMSNorm gammas and up_proj rows x40;
- SmolLM2-135M (torch path): whole-model logits error on held-out rows, and per layer the
  down_proj output error on its real inputs (the SwiGLU product, where SmolLM2's massive
  activations live), with the same per-token INT8 math as the lowering.

Relative error = ||y_q - y_fp|| / ||y_fp|| over all held-out outputs. `w8a16` (INT8 weights,
float activations) is shown as the weight-only floor. Weights: INT8 symmetric per output
channel (RTN); activations: INT8 symmetric per token, dynamic.

Writes benchmarks/results/decompose.md and .json.

    flock /tmp/qpass-cpu.lock .venv/bin/python benchmarks/decompose.py [--no-smollm2]
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
from qpass.passes.decompose import Int8DecomposeConfig, select_channels
from qpass.qconfig import ActGranularity, ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import dynamic_spec, fake_quant_weight

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from models import (  # noqa: E402
    TinyLlama,
    inject_outliers,
    inject_stream_outliers,
    llama_inputs,
    stream_outlier_inputs,
)

W8 = {"format": "int8", "symmetric": True}
A8 = {"format": "int8", "granularity": "per_token", "dynamic": True}
RECIPES = {
    "w8a16 (weight-only floor)": {"weights": W8},
    "w8a8 per-token": {"weights": W8, "activations": A8},
    "w8a8-int8decomp (threshold 6)": "w8a8-int8decomp",
    "w8a8 + int8_decompose top_k 4": {
        "passes": [{"int8_decompose": {"top_k": 4}}],
        "weights": W8,
        "activations": A8,
    },
}


def _rel(ys: list[np.ndarray], refs: list[np.ndarray]) -> float:
    num = sum(float(np.square(y.astype(np.float64) - r).sum()) for y, r in zip(ys, refs, strict=True))
    den = sum(float(np.square(r.astype(np.float64)).sum()) for r in refs)
    return (num / den) ** 0.5


def _channels(res) -> dict:
    """Per-site float channel counts of a quantize result (from the int8_decompose plan)."""
    plans = [r.plan for r in res.report.results if r.name == "int8_decompose"]
    if not plans:
        return {}
    edits = plans[0].edits
    counts = [int(e.channels.numel()) for e in edits]
    distinct = sorted({c for e in edits for c in e.channels.tolist()})
    return {
        "sites": len(plans[0].notes),
        "decomposed_sites": len(edits),
        "float_channels_per_site": counts,
        "distinct_channels": distinct[:16],
    }


def synthetic_models() -> list[tuple[str, torch.nn.Module, list[torch.Tensor]]]:
    torch.manual_seed(0)
    stream = inject_stream_outliers(TinyLlama(dim=256, hidden=512, heads=8, kv_heads=4), factor=30.0)
    torch.manual_seed(0)
    injected = inject_outliers(TinyLlama())
    return [
        (
            "LLaMA-like, massive residual channels (d256)",
            stream,
            [stream_outlier_inputs(seed=i, dim=256) for i in range(8)],
        ),
        (
            "LLaMA-like, injected outliers (tests fixture, d64)",
            injected,
            [llama_inputs(seed=i) for i in range(8)],
        ),
    ]


def synthetic(tmp: Path) -> list[dict]:
    rows = []
    for label, model, batches in synthetic_models():
        calib, held = batches[:4], batches[4:]
        with torch.no_grad():
            refs = [model(b).numpy() for b in held]
        path = tmp / "model.onnx"
        prog = torch.onnx.export(
            model, (calib[0],), input_names=["x"], output_names=["y"], dynamo=True,
            dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False,
        )  # fmt: skip
        prog.save(str(path))
        onnx_calib = {"x": np.concatenate([b.numpy() for b in calib])}
        for name, recipe in RECIPES.items():
            row = {"model": label, "recipe": name}
            t = time.perf_counter()
            res = qpass.quantize_with_report(model, recipe, calib)
            row["quantize_s_torch"] = time.perf_counter() - t
            with torch.no_grad():
                row["rel_err_torch"] = _rel([res.model(b).numpy() for b in held], refs)
            row.update(_channels(res))
            res_o = qpass.quantize_with_report(str(path), recipe, onnx_calib)
            sess = ort.InferenceSession(res_o.model.SerializeToString(), providers=["CPUExecutionProvider"])
            row["rel_err_onnx"] = _rel([sess.run(None, {"x": b.numpy()})[0] for b in held], refs)
            row["onnx_ops"] = len(res_o.model.graph.node)
            errs = f"torch {row['rel_err_torch']:.4f} onnx {row['rel_err_onnx']:.4f}"
            print(f"{label[:40]:40s} {name:32s} {errs}", flush=True)
            rows.append(row)
    return rows


def smollm2(calib_rows: int, eval_rows: int, seq: int) -> dict:
    from qpass import zoo

    model, tok = zoo.load_smollm2()
    calib = zoo.packed_token_rows(tok, "calib", seq, calib_rows)
    held = zoo.packed_token_rows(tok, "eval", seq, eval_rows)
    batches = [calib[i : i + 2] for i in range(0, len(calib), 2)]
    out: dict = {"calib": f"{calib_rows} x {seq} tokens", "eval": f"{eval_rows} x {seq} tokens"}
    layers = _down_proj_layers(model, calib, held)
    out["down_proj"] = layers
    with torch.no_grad():
        ref = model(held).logits.numpy()
    whole = []
    for name in ("w8a8 per-token", "w8a8-int8decomp (threshold 6)"):
        t = time.perf_counter()
        res = qpass.quantize_with_report(model, RECIPES[name], batches)
        qt = time.perf_counter() - t
        with torch.no_grad():
            y = res.model(held)
        y = y.logits if hasattr(y, "logits") else y[0] if isinstance(y, (tuple, list)) else y
        row = {"recipe": name, "rel_err_logits": _rel([y.numpy()], [ref]), "quantize_s": qt, **_channels(res)}
        row.pop("distinct_channels", None)
        counts = row.pop("float_channels_per_site", [])
        row["float_channels_total"] = sum(counts)
        print(f"SmolLM2 {name:32s} logits rel err {row['rel_err_logits']:.4f} ({qt:.0f}s)", flush=True)
        whole.append(row)
    out["whole_model"] = whole
    return out


def _down_proj_layers(model, calib: torch.Tensor, held: torch.Tensor) -> list[dict]:
    """Per down_proj: relative output error of per-token W8A8 with and without the decomposition."""
    mods = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in mods}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach())) for n, m in mods
    ]
    try:
        with torch.no_grad():
            model(calib)
            calib_x = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in seen.items()}
            for v in seen.values():
                v.clear()
            model(held)
            held_x = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    acfg = ActivationQuantConfig("int8", ActGranularity.PER_TOKEN, dynamic=True)
    spec = dynamic_spec(acfg)
    wcfg = WeightQuantConfig("int8")
    rows = []
    for name, mod in mods:
        w = mod.weight.detach().float()
        x = held_x[name]
        ref = x @ w.T
        ch, _ = select_channels(calib_x[name].abs().amax(0), Int8DecomposeConfig())
        plain = spec.fake_quantize(x) @ fake_quant_weight(w, wcfg).T
        normal = torch.ones(w.shape[1], dtype=torch.bool)
        normal[ch] = False
        dec = (
            spec.fake_quantize(x[:, normal]) @ fake_quant_weight(w[:, normal], wcfg).T + x[:, ch] @ w[:, ch].T
        )
        rows.append(
            {
                "layer": name,
                "max_abs_input": float(calib_x[name].abs().max()),
                "float_channels": ch.tolist(),
                "rel_err_w8a8": float((plain - ref).norm() / ref.norm()),
                "rel_err_int8decomp": float((dec - ref).norm() / ref.norm()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--calib-rows", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        syn = synthetic(Path(tmp))
    _write(syn, None, t0)  # a SmolLM2 run cut short keeps the synthetic table
    if not args.no_smollm2:
        _write(syn, smollm2(args.calib_rows, args.eval_rows, args.seq), t0)


def _write(syn: list[dict], real: dict | None, t0: float) -> None:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, CPU, 1 thread (shared machine; no latency measured)",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "run_s": round(time.perf_counter() - t0),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "decompose.json").write_text(
        json.dumps({"meta": meta, "synthetic": syn, "smollm2": real}, indent=2)
    )
    (out / "decompose.md").write_text(_markdown(meta, syn, real))


def _markdown(meta: dict, syn: list[dict], real: dict | None) -> str:
    lines = [
        "# LLM.int8 decomposition vs plain per-token W8A8",
        "",
        "`benchmarks/decompose.py`. Relative output error ||y_q - y_fp|| / ||y_fp|| on held-out inputs",
        "(4 calibration and 4 held-out batches of 4 x 16 tokens). Weights INT8 symmetric per output",
        "channel (RTN); activations INT8 per token, dynamic. Float channels: per decomposed linear.",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| model | recipe | rel err torch | rel err ONNX (onnxruntime) | decomposed sites | float channels per site |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in syn:
        counts = r.get("float_channels_per_site")
        per_site = f"{min(counts)}..{max(counts)} (channels {r['distinct_channels']})" if counts else "—"
        sites = f"{r['decomposed_sites']}/{r['sites']}" if "sites" in r else "—"
        errs = f"{r['rel_err_torch']:.4f} | {r['rel_err_onnx']:.4f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {errs} | {sites} | {per_site} |")
    if real is not None:
        lines += [
            "",
            f"## SmolLM2-135M (torch path; calibration {real['calib']}, held out {real['eval']})",
            "",
            "| recipe | logits rel err | decomposed sites | float channels (all sites) | quantize s |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in real["whole_model"]:
            sites = f"{r['decomposed_sites']}/{r['sites']}" if "sites" in r else "—"
            lines.append(
                f"| {r['recipe']} | {r['rel_err_logits']:.4f} | {sites} | {r.get('float_channels_total', 0)} "
                f"| {r['quantize_s']:.0f} |"
            )
        lines += [
            "",
            "Per down_proj (its real inputs, same per-token INT8 math as the lowering; threshold 6):",
            "",
            "| layer | calib max abs input | float channels | rel err w8a8 | rel err int8decomp |",
            "|---|---:|---|---:|---:|",
        ]
        for r in real["down_proj"]:
            ch = r["float_channels"]
            shown = f"{len(ch)}: {ch[:6]}{' ...' if len(ch) > 6 else ''}"
            lines.append(
                f"| {r['layer']} | {r['max_abs_input']:.1f} | {shown} | {r['rel_err_w8a8']:.4f} "
                f"| {r['rel_err_int8decomp']:.4f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
