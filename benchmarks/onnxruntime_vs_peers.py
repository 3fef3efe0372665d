"""qpass's ONNX Runtime lowering vs ONNX Runtime's own quantizers, in one run.

Models: MiniLM (all-MiniLM-L6-v2 sentence embedder) and, with ``--smollm2``, SmolLM2-135M
exported to ONNX (prefill: ``input_ids [B, 128] -> logits``, no KV cache; see DECODE_NOTE).

Quantizers, all fed the same calibration data where they take any:
- FP32 (the reference);
- ORT ``quantize_dynamic`` (QInt8, per channel);
- ORT ``quantize_static`` (QDQ, per channel, MinMax): defaults, and MatMul/Gemm only;
- ORT ``MatMulNBitsQuantizer`` (4-bit, asymmetric, its default RTN) with blocks of 32 and 128,
  and its GPTQ option (``GPTQWeightOnlyQuantConfig``) when its dependency is installed;
- qpass ``w8a8``, ``w8a8-smooth`` (static QDQ), ``w8a8-dynamic``, ``w8a8-smooth-dynamic`` (per
  token, MatMulInteger), ``w4a16``, ``w4a16-gptq`` (MatMulNBits), ``w4a8-rotate`` (Hadamard
  rotations as function ops, per-token int8 activations on MatMulInteger).

Metrics: file size, median latency at batch 1 and batch 32 (sequence 128, 2 intra-op threads,
interleaved runs) as a ratio to FP32, and held-out accuracy: MiniLM embedding cosine vs FP32
and nearest-neighbour agreement; SmolLM2 perplexity on held-out ``pydoc_data.topics`` rows and
next-token (argmax) agreement with FP32. Calibration: 128 MiniLM sentences of
``zoo.sentences('calib')`` (evaluation on disjoint ``zoo.sentences('eval')``); SmolLM2: packed
token rows of the 'calib' split, evaluation rows of the 'eval' split.

Writes ``benchmarks/results/onnxruntime_vs_peers.{md,json}``. Usage::

    .venv/bin/python benchmarks/onnxruntime_vs_peers.py               # MiniLM, ~15 min on 2 cores
    .venv/bin/python benchmarks/onnxruntime_vs_peers.py --smollm2     # + SmolLM2 (much longer)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from minilm_vs_ort import (  # noqa: E402  (benchmarks/ is the script's folder)
    ListReader,
    fixed_length_feed,
    machine,
    op_histogram,
    preprocess_for_ort,
    quant_ops,
    quantize_ort_dynamic,
    quantize_ort_static,
    session,
    timed,
    working_dir,
)
from onnxruntime.quantization import matmul_nbits_quantizer as mnq  # noqa: E402

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402
from qpass.recipe import builtin_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MATMUL_GEMM = ["MatMul", "Gemm"]
QPASS_RECIPES = (
    "w8a8",
    "w8a8-smooth",
    "w8a8-dynamic",
    "w8a8-smooth-dynamic",
    "w4a16",
    "w4a16-gptq",
    "w4a8-rotate",
)

SMOLLM2_MODELS = [  # the issue's rows (ORT's GPTQ failed on MiniLM already; defaults-QDQ is for encoders)
    "ORT dynamic (QInt8, per channel)",
    "ORT static QDQ (MatMul/Gemm)",
    "ORT MatMulNBits RTN b32",
    "ORT MatMulNBits RTN b128",
    *(f"qpass {r}" for r in ("w8a8", "w8a8-smooth", "w8a8-dynamic", "w4a16", "w4a16-gptq", "w4a8-rotate")),
    "qpass w4a16 g32",
    "qpass w4a16-gptq g32",
]
DECODE_NOTE = (
    "Decode (one token with a KV cache) is not measured: `export_smollm2` exports the prefill graph "
    "(`use_cache=False`, logits only). A decode graph needs the 30 layers' past keys/values as 60 "
    "extra graph inputs and outputs (a wrapper rebuilding transformers' DynamicCache for torch.export), "
    "calibration feeds with a cache for every calibrating quantizer, and a second set of ten "
    "quantized models; not done in this run."
)

log = logging.getLogger("onnxruntime_vs_peers")


# ----------------------------------------------------------------------------- quantizers


def quantize_qpass(
    src: Path, dst: Path, recipe: str | dict[str, Any], calib: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    _, secs = timed(lambda: qpass.quantize_file(src, dst, recipe, calib, batch_size=8))
    return {"quant_s": secs}


def quantize_ort_nbits(
    src: Path, dst: Path, block: int, calib: list[dict[str, np.ndarray]] | None
) -> dict[str, Any]:
    """ORT's MatMulNBits quantizer: its default RTN config, or GPTQ (needs neural_compressor)."""
    import onnx

    def go() -> None:
        algo = None
        if calib is not None:
            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=ListReader(calib), block_size=block)
        q = mnq.MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=4, block_size=block, is_symmetric=False, algo_config=algo
        )
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)

    _, secs = timed(go)
    return {"quant_s": secs}


def jobs_for(src: Path, pre: Path, calib: list, ort_calib: list) -> list[tuple[str, Callable[[Path], dict]]]:
    jobs: list[tuple[str, Callable[[Path], dict]]] = [
        ("ORT dynamic (QInt8, per channel)", lambda d: quantize_ort_dynamic(pre, d, per_channel=True)),
        ("ORT static QDQ (defaults)", lambda d: quantize_ort_static(pre, d, ort_calib, None)),
        ("ORT static QDQ (MatMul/Gemm)", lambda d: quantize_ort_static(pre, d, ort_calib, MATMUL_GEMM)),
        ("ORT MatMulNBits RTN b32", lambda d: quantize_ort_nbits(src, d, 32, None)),
        ("ORT MatMulNBits RTN b128", lambda d: quantize_ort_nbits(src, d, 128, None)),
        ("ORT MatMulNBits GPTQ b128", lambda d: quantize_ort_nbits(src, d, 128, ort_calib)),
    ]
    jobs += [(f"qpass {r}", lambda d, r=r: quantize_qpass(src, d, r, calib)) for r in QPASS_RECIPES]
    jobs += [
        (f"qpass {r} g32", lambda d, r=r: quantize_qpass(src, d, with_group(r, 32), calib))
        for r in ("w4a16", "w4a16-gptq")
    ]
    return jobs


def with_group(name: str, group: int) -> dict[str, Any]:
    """A built-in recipe with another weight group size (32: ORT's other block size)."""
    data = yaml.safe_load(builtin_text(name))
    data["name"] = f"{name}-g{group}"
    data["weights"]["group"] = group
    return data


def quantize_all(src: Path, work: Path, tag: str, jobs: list) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {"fp32": {"path": src, "quant_s": None}}
    for i, (name, job) in enumerate(jobs):
        dst = work / f"{tag}_q{i}.onnx"
        log.info("%s: quantizing %s", tag, name)
        try:
            with working_dir(work):
                models[name] = {"path": dst, **job(dst)}
        except Exception as exc:  # noqa: BLE001 - one failed quantizer is a result, not the end
            first = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            log.warning("%s failed: %s", name, first)
            models[name] = {"path": dst, "error": first, "trace": traceback.format_exc(limit=3)}
        else:
            log.info("  %.1f s", models[name]["quant_s"])
    return models


def lean_session(path: Path) -> ort.InferenceSession:
    """`session` without the memory arena: ten SmolLM2 sessions each keeping a batch-32 arena
    (the logits alone are 0.8 GB) would not fit in this machine's memory.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def open_sessions(models: dict[str, dict[str, Any]], lean: bool = False) -> dict[str, ort.InferenceSession]:
    sessions = {}
    for name, r in models.items():
        if r.get("error"):
            continue
        try:
            sessions[name] = (lean_session if lean else session)(r["path"])
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot load is a result
            r["error"] = f"onnxruntime cannot load it: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        else:
            r["size_mb"] = os.path.getsize(r["path"]) / 1e6
            r["quant_ops"] = quant_ops(op_histogram(r["path"]))
    return sessions


def time_interleaved(sessions: dict, feed: dict, output: str, warmup: int, runs: int) -> dict[str, float]:
    import statistics

    for s in sessions.values():
        for _ in range(warmup):
            s.run([output], feed)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run([output], feed)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def add_latency(
    models, sessions, feeds: dict[str, dict], output: str, args, runs_b32: int | None = None
) -> None:
    for label, feed in feeds.items():
        runs = args.runs_b1 if label == "b1" else (runs_b32 or args.runs_b32)
        warmup = args.warmup if label == "b1" or runs_b32 is None else 1
        t = time_interleaved(sessions, feed, output, warmup, runs)
        for name, ms in t.items():
            models[name][f"latency_ms_{label}"] = ms
            models[name][f"ratio_{label}"] = ms / t["fp32"]


# ----------------------------------------------------------------------------- MiniLM


def run_minilm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    embedder, tok = zoo.load_minilm_embedder()
    fp32 = work / "minilm_fp32.onnx"
    zoo.export_minilm_onnx(fp32, embedder=embedder, tokenizer=tok)
    calib_sents = zoo.sentences("calib", args.n_calib)
    calib = zoo.minilm_batches(tok, calib_sents, 16, 128)
    ort_calib = zoo.minilm_batches(tok, calib_sents, 1, 128)  # ORT cannot mask padding
    eval_sents = zoo.sentences("eval", min(args.n_eval, len(zoo.sentences("eval"))))
    evals = zoo.minilm_batches(tok, eval_sents, 32, 128)
    with working_dir(work):
        pre = preprocess_for_ort(fp32, work / "minilm_fp32.pre.onnx")
    models = quantize_all(fp32, work, "minilm", jobs_for(fp32, Path(pre["input"]), calib, ort_calib))
    sessions = open_sessions(models)
    ref = np.concatenate([sessions["fp32"].run(["embedding"], b)[0] for b in evals])
    for name, s in sessions.items():
        q = np.concatenate([s.run(["embedding"], b)[0] for b in evals])
        models[name].update(zoo.embedding_agreement(ref, q))
    feeds = {
        "b1": fixed_length_feed(tok, eval_sents[:1], args.seq_len),
        "b32": fixed_length_feed(tok, (eval_sents * 32)[:32], args.seq_len),
    }
    log.info("MiniLM: timing")
    add_latency(models, sessions, feeds, "embedding", args)
    for r in models.values():
        r["path"] = Path(r["path"]).name
    return {
        "models": models,
        "n_calib": len(calib_sents),
        "n_eval": len(eval_sents),
        "ort_preprocess": {k: v for k, v in pre.items() if k != "input"},
    }


# ----------------------------------------------------------------------------- SmolLM2


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_smollm2(path: Path, model: torch.nn.Module, seq: int) -> None:
    example = torch.zeros(2, seq, dtype=torch.long)  # batch 1 would be specialised to a constant
    batch = torch.export.Dim("batch", max=64)
    torch.onnx.export(
        _Logits(model).eval(),
        (example,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        opset_version=18,
        dynamo=True,
        dynamic_shapes={"input_ids": {0: batch}},
        external_data=False,
        verbose=False,
    )


def run_smollm2(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model, tok = zoo.load_smollm2()
    seq = 128
    fp32 = work / "smollm2_fp32.onnx"
    t0 = time.perf_counter()
    export_smollm2(fp32, model, seq)
    export_s = time.perf_counter() - t0
    calib_rows = zoo.packed_token_rows(tok, "calib", seq, args.smollm2_calib)
    eval_rows = zoo.packed_token_rows(tok, "eval", seq, args.smollm2_eval)
    calib = [{"input_ids": calib_rows[i : i + 4].numpy()} for i in range(0, len(calib_rows), 4)]
    ort_calib = [{"input_ids": calib_rows[i : i + 1].numpy()} for i in range(len(calib_rows))]
    with working_dir(work):
        pre = preprocess_for_ort(fp32, work / "smollm2_fp32.pre.onnx")
    jobs = [j for j in jobs_for(fp32, Path(pre["input"]), calib, ort_calib) if j[0] in args.smollm2_models]
    models = quantize_all(fp32, work, "smollm2", jobs)
    sessions = open_sessions(models, lean=True)

    def logits_of(s: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.from_numpy(s.run(["logits"], {"input_ids": x.numpy()})[0])

    ref_pred = None
    for name, s in sessions.items():
        fn = logits_of(s)
        models[name]["perplexity"] = zoo.perplexity(fn, eval_rows, batch_size=4)
        pred = torch.cat([fn(eval_rows[i : i + 4]).argmax(-1) for i in range(0, len(eval_rows), 4)])
        if ref_pred is None:
            ref_pred = pred
        models[name]["next_token_agreement"] = float((pred == ref_pred).float().mean())
        log.info("SmolLM2 %s: ppl %.3f", name, models[name]["perplexity"])
    feeds = {"b1": {"input_ids": eval_rows[:1].numpy()}}
    if args.smollm2_b32:
        feeds["b32"] = {"input_ids": eval_rows[:32].numpy()}
    log.info("SmolLM2: timing")
    add_latency(models, sessions, feeds, "logits", args, runs_b32=args.smollm2_runs_b32)
    for r in models.values():
        r["path"] = Path(r["path"]).name
    return {
        "models": models,
        "export_s": export_s,
        "n_calib_rows": len(calib_rows),
        "n_eval_rows": len(eval_rows),
        "runs_b32": args.smollm2_runs_b32,
        "decode": DECODE_NOTE,
    }


# ----------------------------------------------------------------------------- report


def _f(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _quant_op_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per quantized model: the quantized ops its file holds."""
    return [
        f"- {name}: " + (", ".join(f"{k} {v}" for k, v in r["quant_ops"].items()) or "none")
        for name, r in models.items()
        if not r.get("error") and name != "fp32"
    ]


def markdown(res: dict[str, Any]) -> str:
    m, cfg = res["machine"], res["config"]
    lines = [
        "# qpass ONNX Runtime lowering vs ONNX Runtime's quantizers",
        "",
        f"`benchmarks/onnxruntime_vs_peers.py`. Machine: {m['cpu']}, {m['cpu_count']} cores (shared); "
        f"onnxruntime {m['onnxruntime']}, CPUExecutionProvider, {cfg['threads']} intra-op threads, "
        f"date {m['date']}. Latency: sequence {cfg['seq_len']}, {cfg['warmup']} warm-up runs, median of "
        f"{cfg['runs_b1']} (batch 1) / {cfg['runs_b32']} (batch 32) interleaved runs; ratio = model / FP32.",
        "",
        f"Load average (1, 5, 15 min) at the start: {res.get('loadavg_start', 'n/a')}; "
        f"after MiniLM: {res.get('loadavg_minilm', 'n/a')}; at the end: {res.get('loadavg_end', 'n/a')}. "
        "The 2 cores are shared with other jobs: latency ratios are indicative; accuracy is deterministic.",
        "",
    ]
    mini = res.get("minilm")
    if mini:
        lines += [
            f"## MiniLM sentence embeddings ({mini['n_calib']} calibration sentences, {mini['n_eval']} held-out)",
            "",
            "| model | mean cos | min cos | NN agree | size MB | b1 ratio | b32 ratio | quant s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in mini["models"].items():
            if r.get("error"):
                lines.append(f"| {name} | not run: {r['error']} | | | | | | |")
                continue
            lines.append(
                f"| {name} | {_f(r.get('mean_cosine'), '.4f')} | {_f(r.get('min_cosine'), '.4f')} "
                f"| {_f(r.get('nn_agreement'), '.3f')} | {r['size_mb']:.1f} | {_f(r.get('ratio_b1'), '.2f')} "
                f"| {_f(r.get('ratio_b32'), '.2f')} | {_f(r.get('quant_s'), '.1f')} |"
            )
        lines += ["", "Quantized ops in each file:", "", *_quant_op_lines(mini["models"]), ""]
    smol = res.get("smollm2")
    if smol:
        lines += [
            f"## SmolLM2-135M prefill, seq 128 ({smol.get('n_calib_rows')} calibration rows, "
            f"{smol.get('n_eval_rows')} held-out rows)",
            "",
        ]
        if smol.get("skipped"):
            lines += [f"Skipped: {smol['skipped']}", ""]
        else:
            lines += [
                f"Batch-32 latency: 1 warm-up run, median of {smol.get('runs_b32')} runs.",
                "",
                "| model | perplexity | next-token agree | size MB | b1 ratio | b32 ratio | quant s |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for name, r in smol["models"].items():
                if r.get("error"):
                    lines.append(f"| {name} | not run: {r['error']} | | | | | |")
                    continue
                lines.append(
                    f"| {name} | {_f(r.get('perplexity'), '.3f')} | {_f(r.get('next_token_agreement'), '.3f')} "
                    f"| {r['size_mb']:.1f} | {_f(r.get('ratio_b1'), '.2f')} | {_f(r.get('ratio_b32'), '.2f')} "
                    f"| {_f(r.get('quant_s'), '.1f')} |"
                )
            lines += ["", "Quantized ops in each file:", "", *_quant_op_lines(smol["models"])]
            lines += ["", smol.get("decode", ""), ""]
    lines += [f"Total time: {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs-b1", type=int, default=20)
    p.add_argument("--runs-b32", type=int, default=5)
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (export + quantize: long)")
    p.add_argument("--smollm2-calib", type=int, default=16)
    p.add_argument("--smollm2-eval", type=int, default=16)
    p.add_argument("--smollm2-b32", action="store_true", help="also time SmolLM2 at batch 32")
    p.add_argument("--smollm2-runs-b32", type=int, default=3, help="SmolLM2 batch-32 runs (seconds each)")
    p.add_argument("--smollm2-models", nargs="*", default=SMOLLM2_MODELS)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "threads": 2,
            "seq_len": args.seq_len,
            "warmup": args.warmup,
            "runs_b1": args.runs_b1,
            "runs_b32": args.runs_b32,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def loadavg() -> str:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())

    res["loadavg_start"] = loadavg()

    def save() -> None:
        res["loadavg_end"] = loadavg()
        res["total_s"] = time.perf_counter() - t0
        (args.out / "onnxruntime_vs_peers.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (args.out / "onnxruntime_vs_peers.md").write_text(markdown(res))

    with tempfile.TemporaryDirectory(prefix="ort_peers_") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.no_minilm:
            res["minilm"] = run_minilm(args, work)
            res["loadavg_minilm"] = loadavg()
            save()
        if args.smollm2:
            try:
                res["smollm2"] = run_smollm2(args, work)
            except Exception as exc:  # noqa: BLE001 - report why SmolLM2 could not be measured
                res["smollm2"] = {"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
                log.warning("SmolLM2 skipped: %s", res["smollm2"]["skipped"])
        else:
            res["smollm2"] = {"skipped": "not requested (--smollm2)"}
        save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
