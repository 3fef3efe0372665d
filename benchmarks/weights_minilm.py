"""Weight quantizers on the real MiniLM: per-layer GPTQ vs RTN, embeddings vs ONNX Runtime, GPTQ time.

Writes ``benchmarks/results/weights_minilm.{md,json}``. Four parts, one run:

1. Per layer (all 36 linears of all-MiniLM-L6-v2): relative output MSE
   ``||X (W - W_q)ᵀ||² / ||X Wᵀ||²`` on HELD-OUT inputs (``zoo.sentences("eval")``) of INT4 g128
   symmetric weights by RTN, RTN + MSE clip search, GPTQ (act-order, dynamic groups), GPTQ with
   act-order + static groups and GPTQ without act-order; GPTQ's Hessian comes from the
   calibration sentences (``zoo.sentences("calib")``; the two splits share no sentence).
2. Held-out sentence-embedding cosine to FP32 (``zoo.embedding_agreement``) of qpass recipes
   on the torch path (``qpass.quantize_with_report`` on ``MiniLMEmbedder``; the lowered
   ``QuantLinear`` applies the dequantized weight) and of ONNX Runtime's ``MatMulNBitsQuantizer``
   on the exported ONNX (its default RTN and its GPTQ, the Intel Neural Compressor copy that
   ships inside onnxruntime, fed the same calibration batches through a data reader; runs offline),
   at 4 bits, blocks of 128 and 32, symmetric and asymmetric.
3. Mixed precision (``mixed-4.5bit``) against uniform formats at or under the same budget.
4. GPTQ wall time on a random 4096 x 11008 layer (``[out, in]``, LLaMA-7B's down_proj shape)
   with a realistic Hessian (per-channel log-normal scales, a few outlier channels, a shared
   low-rank component) on this machine's CPU threads.

Run: ``python benchmarks/weights_minilm.py`` (about 20-30 min on 2 shared cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from minilm_vs_ort import ListReader  # noqa: E402  (benchmarks/ is the script's folder; ORT's GPTQ deep-copies it)
from onnxruntime.quantization import matmul_nbits_quantizer as mnb  # noqa: E402

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402
from qpass.formats import Granularity, QuantSpec  # noqa: E402
from qpass.formats.spec import ElementType  # noqa: E402
from qpass.quant.gptq import gptq  # noqa: E402
from qpass.quant.lorc import layer_error  # noqa: E402
from qpass.quant.rtn import rtn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_BATCH = 16
EVAL_BATCH = 32
MAX_LEN = 128


def int_spec(bits: int, group: int | None, symmetric: bool = True) -> QuantSpec:
    element = ElementType(f"int{bits}")
    if group is None:
        return QuantSpec(element, Granularity.PER_CHANNEL, axis=0, symmetric=symmetric)
    return QuantSpec(element, Granularity.PER_GROUP, axis=-1, group_size=group, symmetric=symmetric)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- part 1


def linear_hessians(
    model: torch.nn.Module, batches: Sequence[dict[str, np.ndarray]]
) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every nn.Linear's input over the real (unmasked) tokens of `batches`."""
    acc: dict[str, torch.Tensor] = {}
    mask_rows: list[torch.Tensor] = []

    def hook(name: str):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[mask_rows[0]].to(torch.float64)
            acc[name] = acc.get(name, 0) + x.T @ x

        return fn

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            for b in batches:
                mask_rows[:] = [torch.from_numpy(b["attention_mask"]).reshape(-1).bool()]
                model(**to_torch(b))
    finally:
        for h in handles:
            h.remove()
    return acc


def per_layer(model: torch.nn.Module, calib, evals) -> dict[str, Any]:
    h_cal, h_eval = linear_hessians(model, calib), linear_hessians(model, evals)
    spec = int_spec(4, 128)
    rows = []
    t_gptq = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach().to(torch.float32)
        hc, he = h_cal[name].to(torch.float32), h_eval[name]
        t = time.perf_counter()
        q_gptq = gptq(w, hc, spec, act_order=True).dequantized()
        t_gptq += time.perf_counter() - t
        variants = {
            "rtn": rtn(w, spec).dequantized(),
            "rtn_clip": rtn(w, spec, clip_search=True).dequantized(),
            "gptq_act": q_gptq,
            "gptq_act_static": gptq(w, hc, spec, act_order=True, static_groups=True).dequantized(),
            "gptq_noact": gptq(w, hc, spec, act_order=False).dequantized(),
        }
        row = {"layer": name.removeprefix("encoder."), "shape": list(w.shape)}
        row.update({k: layer_error(w, v, he) for k, v in variants.items()})
        rows.append(row)
        print(f"  {row['layer']:45s} rtn {row['rtn']:.3e} gptq {row['gptq_act']:.3e}", flush=True)
    n = len(rows)
    summary = {
        "n_layers": n,
        "gptq_wins_vs_rtn": sum(r["gptq_act"] < r["rtn"] for r in rows) / n,
        "gptq_wins_vs_rtn_clip": sum(r["gptq_act"] < r["rtn_clip"] for r in rows) / n,
        "gptq_static_wins_vs_rtn": sum(r["gptq_act_static"] < r["rtn"] for r in rows) / n,
        "mean": {
            k: float(np.mean([r[k] for r in rows]))
            for k in ("rtn", "rtn_clip", "gptq_act", "gptq_act_static", "gptq_noact")
        },
        "gptq_seconds_all_layers": t_gptq,
    }
    return {"rows": rows, "summary": summary}


# ----------------------------------------------------------------------------- part 2


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_quantize(src: Path, dst: Path, algo: str, block: int, symmetric: bool, calib) -> float:
    if algo == "rtn":
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric)
    else:
        cfg = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=ListReader(calib), block_size=128)
    q = mnb.MatMulNBitsQuantizer(str(src), bits=4, block_size=block, is_symmetric=symmetric, algo_config=cfg)
    t = time.perf_counter()
    q.process()
    seconds = time.perf_counter() - t
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return seconds


def wrecipe(**weights: Any) -> dict[str, Any]:
    return {"passes": [], "weights": weights, "activations": None, "target": "torch"}


MIXED_RTN = wrecipe(  # mixed-4.5bit with RTN candidates: the same budget and formats, no GPTQ
    format="int4",
    group=128,
    algo="rtn",
    mixed={
        "budget_bits": 4.5,
        "candidates": [{"format": "int3", "group": 128}, {"format": "int4", "group": 32}, {"format": "int8"}],
    },
)


QPASS_RECIPES: list[tuple[str, Any, float]] = [  # label, recipe, nominal bits/weight (fp16 scales)
    ("qpass RTN int4 g128 sym (w4a16)", wrecipe(format="int4", group=128, algo="rtn"), 4.125),
    ("qpass RTN+clip int4 g128 sym", wrecipe(format="int4", group=128, algo="rtn", clip_search=True), 4.125),
    ("qpass GPTQ int4 g128 sym (w4a16-gptq)", "w4a16-gptq", 4.125),
    ("qpass AWQ int4 g128 sym (w4a16-awq)", "w4a16-awq", 4.125),
    ("qpass RTN int4 g128 asym", wrecipe(format="int4", group=128, symmetric=False, algo="rtn"), 4.156),
    ("qpass GPTQ int4 g128 asym", wrecipe(format="int4", group=128, symmetric=False, algo="gptq"), 4.156),
    ("qpass RTN int4 g32 sym", wrecipe(format="int4", group=32, algo="rtn"), 4.5),
    ("qpass GPTQ int4 g32 sym", wrecipe(format="int4", group=32, algo="gptq"), 4.5),
    ("qpass GPTQ int4 g32 asym", wrecipe(format="int4", group=32, symmetric=False, algo="gptq"), 4.625),
    ("qpass mixed-4.5bit", "mixed-4.5bit", 4.5),
    ("qpass mixed-4.5bit, RTN candidates", MIXED_RTN, 4.5),
    ("qpass GPTQ int3 g128 sym", wrecipe(format="int3", group=128, algo="gptq"), 3.125),
    ("qpass w3a16-gptq-lorc (rank 8)", "w3a16-gptq-lorc", None),
]

ORT_RUNS = [  # label, algo, block, symmetric, nominal bits
    ("ORT MatMulNBits RTN b128 sym", "rtn", 128, True, 4.125),
    ("ORT MatMulNBits RTN b128 asym", "rtn", 128, False, 4.156),
    ("ORT MatMulNBits GPTQ b128 sym", "gptq", 128, True, 4.125),
    ("ORT MatMulNBits GPTQ b128 asym", "gptq", 128, False, 4.156),
    ("ORT MatMulNBits RTN b32 sym", "rtn", 32, True, 4.5),
    ("ORT MatMulNBits GPTQ b32 sym", "gptq", 32, True, 4.5),
]


def embeddings(
    embedder,
    tok,
    calib,
    evals,
    work: Path,
    threads: int,
    only: set[str] | None,
    rows: list,
    save,
    skip_ort: bool = False,
) -> list[dict[str, Any]]:
    fp = zoo.embed_batches(embedder, evals)
    calib_t = [to_torch(b) for b in calib]
    for label, recipe, bits in QPASS_RECIPES:
        if only and not any(o in label for o in only):
            continue
        t = time.perf_counter()
        try:
            res = qpass.quantize_with_report(embedder, recipe, calib_t)
        except Exception as exc:  # noqa: BLE001 - a failing recipe is a result to report
            rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {label}: FAILED {exc}", flush=True)
            continue
        seconds = time.perf_counter() - t
        agree = zoo.embedding_agreement(fp, zoo.embed_batches(res.model, evals))
        row = {"label": label, "bits": bits, "quantize_s": seconds, **agree}
        if "mixed" in label:
            notes = [
                n.detail for r in res.report.results for n in r.plan.notes if n.detail.startswith("mixed")
            ]
            row["mixed_summary"] = notes[-1]
            row["mixed_layers"] = {
                n.site: n.detail.split(" (")[0].removeprefix("mixed: ")
                for r in res.report.results
                for n in r.plan.notes
                if n.detail.startswith("mixed: ")
            }
            row["bits"] = float(notes[-1].split("mixed precision: ")[1].split(" ")[0])
        rows.append(row)
        save()
        print(f"  {label:42s} cos {agree['mean_cosine']:.5f} ({seconds:.0f}s)", flush=True)
    if skip_ort:
        return rows
    try:
        src = Path(zoo.export_minilm_onnx(work / "minilm.onnx", embedder=embedder, tokenizer=tok))
    except Exception as exc:  # noqa: BLE001 - keep the qpass rows
        rows.append({"label": "ONNX export for ORT", "error": f"{type(exc).__name__}: {exc}"})
        return rows
    for label, algo, block, sym, bits in ORT_RUNS:
        if only and not any(o in label for o in only):
            continue
        dst = work / f"ort_{algo}_{block}_{sym}.onnx"
        try:
            seconds = ort_quantize(src, dst, algo, block, sym, calib)
            sess = session(dst, threads)
            q = np.concatenate([sess.run(["embedding"], b)[0] for b in evals])
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {label}: FAILED {exc}", flush=True)
            continue
        agree = zoo.embedding_agreement(fp, q)
        rows.append({"label": label, "bits": bits, "quantize_s": seconds, **agree})
        save()
        print(f"  {label:42s} cos {agree['mean_cosine']:.5f} ({seconds:.0f}s)", flush=True)
    return rows


# ----------------------------------------------------------------------------- part 4


def gptq_big(n_out: int, n_in: int, tokens: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(n_in, generator=gen))
    outliers = torch.randperm(n_in, generator=gen)[: max(1, n_in // 200)]
    scale[outliers] *= 30.0
    t = time.perf_counter()
    x = torch.randn(tokens, n_in, generator=gen)
    x += torch.randn(tokens, 32, generator=gen) @ torch.randn(32, n_in, generator=gen) * 0.5
    x *= scale
    h = x.T @ x
    del x
    h_seconds = time.perf_counter() - t
    w = torch.randn(n_out, n_in, generator=gen) * 0.02
    spec = int_spec(4, 128)
    out = {
        "shape": [n_out, n_in],
        "tokens": tokens,
        "hessian_s": h_seconds,
        "threads": torch.get_num_threads(),
    }
    for key, kw in (
        ("act_order", {"act_order": True}),
        ("act_order_static", {"act_order": True, "static_groups": True}),
    ):
        t = time.perf_counter()
        qw = gptq(w, h, spec, **kw)
        out[f"{key}_s"] = time.perf_counter() - t
        out[f"{key}_err"] = layer_error(w, qw.dequantized(), h)
        print(f"  gptq {key}: {out[f'{key}_s']:.1f}s", flush=True)
    out["rtn_err"] = layer_error(w, rtn(w, spec).dequantized(), h)
    out["loadavg"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return out


# ----------------------------------------------------------------------------- report


def _f(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        "# Weight quantizers on MiniLM (all-MiniLM-L6-v2)",
        "",
        f"Generated by `python benchmarks/weights_minilm.py` on {res['date']} ({res['machine']}).",
        f"Calibration: {cfg['n_calib']} sentences of `zoo.sentences('calib')` in batches of {CALIB_BATCH}; "
        f"held-out: {cfg['n_eval']} sentences of `zoo.sentences('eval')` (disjoint).",
        "",
    ]
    if "per_layer" in res:
        s = res["per_layer"]["summary"]
        m = s["mean"]
        lines += [
            "## 1. Per-layer output error, INT4 g128 symmetric (held-out inputs)",
            "",
            "Relative output MSE `||X(W-Wq)ᵀ||²/||XWᵀ||²` with X the held-out inputs of each linear; "
            "GPTQ's Hessian from the calibration sentences.",
            "",
            f"- GPTQ (act-order) beats RTN on **{s['gptq_wins_vs_rtn']:.0%}** of {s['n_layers']} layers "
            f"(vs RTN + MSE clip search: {s['gptq_wins_vs_rtn_clip']:.0%}; act-order + static groups vs RTN: "
            f"{s['gptq_static_wins_vs_rtn']:.0%}).",
            f"- Mean over layers: RTN {m['rtn']:.3e}, RTN+clip {m['rtn_clip']:.3e}, "
            f"GPTQ act-order {m['gptq_act']:.3e}, "
            f"GPTQ act-order + static groups {m['gptq_act_static']:.3e}, GPTQ without act-order {m['gptq_noact']:.3e}.",
            f"- GPTQ (act-order) on all 36 layers took {s['gptq_seconds_all_layers']:.1f} s.",
            "",
            "| layer | shape | RTN | RTN+clip | GPTQ act | GPTQ act+static | GPTQ no act |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["per_layer"]["rows"]:
            lines.append(
                f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['rtn']:.3e} | {r['rtn_clip']:.3e} | "
                f"{r['gptq_act']:.3e} | {r['gptq_act_static']:.3e} | {r['gptq_noact']:.3e} |"
            )
        lines.append("")
    if "embeddings" in res:
        lines += [
            "## 2-3. Held-out sentence embeddings vs FP32",
            "",
            "qpass rows: torch path (`quantize_with_report` on `MiniLMEmbedder`, weights dequantized in "
            "`QuantLinear`). ORT rows: `MatMulNBitsQuantizer` on the exported ONNX, run in ONNX Runtime "
            f"{ort.__version__} (its GPTQ is the Neural Compressor copy inside onnxruntime, act-order off, "
            "given the same calibration batches). Bits/weight count fp16 scales (and 4-bit zero points "
            "when asymmetric); mixed-4.5bit's is the allocated average.",
            "",
            "| weights | bits/weight | mean cos | min cos | NN agree | quantize s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["embeddings"]:
            if "error" in r:
                lines.append(f"| {r['label']} | — | failed: {r['error'][:120]} | | | |")
                continue
            lines.append(
                f"| {r['label']} | {_f(r['bits'], '.3f')} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | "
                f"{r['nn_agreement']:.3f} | {r['quantize_s']:.0f} |"
            )
        mixed = next((r for r in res["embeddings"] if "mixed_summary" in r), None)
        if mixed:
            counts: dict[str, int] = {}
            for v in mixed["mixed_layers"].values():
                counts[v] = counts.get(v, 0) + 1
            lines += [
                "",
                f"mixed-4.5bit: {mixed['mixed_summary']}. Layers per format: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                + ".",
            ]
        lines += [
            "",
            "qpass's symmetric INT4 uses the narrow range [-7, 7] (`qpass.formats`); ORT's symmetric INT4 "
            "uses [-8, 7], which is why ORT's symmetric RTN beats qpass's. The asymmetric rows compare "
            "the same grid. `quantize s` includes calibration and is wall time on a shared machine.",
        ]
        lines.append("")
    if "gptq_big" in res:
        g = res["gptq_big"]
        lines += [
            "## 4. GPTQ time on a 4096 x 11008 layer",
            "",
            f"W `[out={g['shape'][0]}, in={g['shape'][1]}]`, INT4 g128 symmetric, Hessian from {g['tokens']} "
            f"synthetic tokens (log-normal channel scales, 0.5% outlier channels x30, rank-32 shared part); "
            f"{g['threads']} torch threads, load average {g.get('loadavg', res['loadavg'])} when it ran.",
            "",
            "| variant | seconds | rel. output error | RTN error |",
            "|---|---:|---:|---:|",
            f"| act-order (dynamic groups, g_idx) | {g['act_order_s']:.1f} | {g['act_order_err']:.3e} "
            f"| {g['rtn_err']:.3e} |",
            f"| act-order + static groups | {g['act_order_static_s']:.1f} | {g['act_order_static_err']:.3e} "
            f"| {g['rtn_err']:.3e} |",
            "",
            f"Building the Hessian (not counted) took {g['hessian_s']:.1f} s. The errors are in-sample "
            f"(the H GPTQ minimised): {g['tokens']} tokens give H rank <= {g['tokens']} < {g['shape'][1]} inputs, "
            "so GPTQ can put its error where the data has no energy; section 1 has held-out layer errors.",
            "",
        ]
    return "\n".join(lines)


def merge(paths: Sequence[str], out: Path) -> None:
    """Combine partial runs (parts split over processes) into one results file; embedding rows in table order."""
    res: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for p in paths:  # a later part's row replaces an earlier one with the same label
        part = json.loads(Path(p).read_text())
        new = part.pop("embeddings", [])
        labels = {r["label"] for r in new}
        rows = [r for r in rows if r["label"] not in labels] + new
        res.update({k: v for k, v in part.items() if k not in res or k in ("per_layer", "gptq_big")})
    order = [label for label, _, _ in QPASS_RECIPES] + [label for label, *_ in ORT_RUNS]
    if rows:
        res["embeddings"] = sorted(rows, key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=247)  # the whole eval split
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="layers,embeddings,big", help="comma list: layers, embeddings, big")
    ap.add_argument("--only", default="", help="comma list of substrings: only these embedding rows")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    ap.add_argument("--out", default=str(RESULTS / "weights_minilm"))
    ap.add_argument(
        "--merge", nargs="*", default=None, help="JSON files of partial runs to combine into --out"
    )
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", args.n_calib), CALIB_BATCH, MAX_LEN)
    evals = zoo.minilm_batches(tok, zoo.sentences("eval", args.n_eval), EVAL_BATCH, MAX_LEN)
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
        "config": {"n_calib": args.n_calib, "n_eval": args.n_eval},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a long run keeps what it measured
        res["loadavg"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))

    if "big" in parts:  # first: the timing wants the machine before the long parts
        print("gptq 4096x11008", flush=True)
        res["gptq_big"] = gptq_big(4096, 11008, 2048)
        save()
    if "layers" in parts:
        print("per-layer errors", flush=True)
        res["per_layer"] = per_layer(embedder.encoder, calib, evals)
        save()
    if "embeddings" in parts:
        print("embeddings", flush=True)
        only = {o for o in args.only.split(",") if o} or None
        res["embeddings"] = []
        with tempfile.TemporaryDirectory() as work:
            embeddings(
                embedder,
                tok,
                calib,
                evals,
                Path(work),
                args.threads,
                only,
                res["embeddings"],
                save,
                args.no_ort,
            )
        save()
    print(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
