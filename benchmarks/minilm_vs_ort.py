"""qpass vs ONNX Runtime's own quantizers on the real MiniLM sentence embedder (all-MiniLM-L6-v2).

One run exports the embedder to ONNX, quantizes it five ways and compares them side by side:

- FP32 ONNX (the reference);
- qpass ``w8a8`` and ``w8a8-smooth`` (INT8 per-channel weights, INT8 per-tensor static
  activations on linear inputs, QDQ);
- ONNX Runtime ``quantize_static`` (QDQ, per_channel=True, MinMax) fed the same calibration
  sentences through a ``CalibrationDataReader``: once with its defaults (every op type it
  knows), once restricted to ``op_types_to_quantize=["MatMul", "Gemm"]``;
- ONNX Runtime ``quantize_dynamic`` (QInt8 weights): with its defaults (per-tensor weights) and
  with ``per_channel=True``.

ONNX Runtime's documented pre-processing step (``quant_pre_process``: symbolic shape inference
plus graph optimisation) is run once and its output fed to the ORT quantizers; qpass takes the
exported file as is. Calibration sentences come from ``zoo.sentences("calib")``, evaluation
sentences from ``zoo.sentences("eval")``; the two splits share no sentence.

Metrics per model: mean / min cosine of the sentence embeddings vs FP32, nearest-neighbour
agreement (``zoo.embedding_agreement``), file size, latency relative to FP32 at batch 1 and
batch 32 (ONNX Runtime CPU, sequence length fixed, intra_op_num_threads=2, warm-up then the
median of interleaved runs) and quantization wall time.

Writes ``benchmarks/results/minilm_vs_ort.json`` and ``benchmarks/results/minilm_vs_ort.md``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_vs_ort.py            # ~4-6 min on 2 cores
    .venv/bin/python benchmarks/minilm_vs_ort.py --n-calib 64 --runs 5       # quicker, noisier
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnxruntime import quantization as ortq  # noqa: E402

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
CALIB_BATCH = 16
EVAL_BATCH = 32
MATMUL_GEMM = ["MatMul", "Gemm"]
MAX_LEN = 128  # tokenizer truncation for calibration and evaluation (no sentence of the splits is longer)

log = logging.getLogger("minilm_vs_ort")


# ----------------------------------------------------------------------------- helpers


def session(path: str | Path, optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """A CPU session with the benchmark's fixed threading."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # no spin-waiting: several sessions live side by side (and the 2 cores may be shared), where
    # idle threads spinning on a core starve the session being timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, batches: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([sess.run(["embedding"], b)[0] for b in batches])


class ListReader(ortq.CalibrationDataReader):
    """ONNX Runtime calibration reader over a fixed list of feeds (one feed per batch)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def fixed_length_feed(tokenizer: Any, sents: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Real sentences padded (or truncated) to exactly ``seq_len`` tokens, for timing."""
    enc = tokenizer(
        list(sents), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def op_histogram(path: str | Path) -> dict[str, int]:
    """Op types of a model file (domain-qualified when not the default domain)."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(_qualified(n) for n in model.graph.node))


def _qualified(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def quant_ops(hist: dict[str, int]) -> dict[str, int]:
    """The quantization-related entries of an op histogram (qpass's Hadamard function ops included)."""

    def is_quant(op: str) -> bool:
        op = op.rsplit(":", 1)[-1]
        return (
            "quantize" in op.lower()
            or "Integer" in op
            or op.startswith(("QLinear", "QAttention", "QGemm", "MatMulNBits", "Hadamard"))
        )

    return {k: v for k, v in sorted(hist.items()) if is_quant(k)}


def time_interleaved(
    sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], warmup: int, runs: int
) -> dict[str, float]:
    """Median wall time (ms) per session; rounds interleave the sessions so drift hits all alike."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(["embedding"], feed)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(["embedding"], feed)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


@contextlib.contextmanager
def working_dir(folder: Path) -> Iterator[None]:
    """Run inside ``folder``: ORT's quant_pre_process leaves temp files (a ~90 MB ``<uuid>.data``
    and ``sym_shape_infer_temp.onnx``) in the current directory when its shape inference fails.
    """
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- quantizers


def quantize_qpass(src: Path, dst: Path, recipe: str, calib: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    result, secs = timed(lambda: qpass.quantize_file(src, dst, recipe, calib, batch_size=CALIB_BATCH))
    return {"quant_s": secs, "report": result.report.summary()}


def preprocess_for_ort(src: Path, dst: Path) -> dict[str, Any]:
    """ORT's documented pre-processing (``quant_pre_process``).

    Tried with its defaults first; when its symbolic shape inference gives up, again with
    ``skip_symbolic_shape=True`` (ONNX shape inference and ORT's graph optimisation still run).
    If both fail the raw export is used. What happened is recorded.
    """
    errors = []
    for options in ({}, {"skip_symbolic_shape": True}):
        try:
            _, secs = timed(lambda options=options: ortq.quant_pre_process(str(src), str(dst), **options))
        except Exception as exc:  # noqa: BLE001 - any failure of the peer's tool is a result to record
            errors.append(f"{options or 'defaults'}: {type(exc).__name__}: {exc}")
            log.warning("quant_pre_process(%s) failed: %s", options or "defaults", exc)
            continue
        return {"used": True, "options": options, "errors": errors, "seconds": secs, "input": str(dst)}
    return {"used": False, "options": None, "errors": errors, "seconds": None, "input": str(src)}


def quantize_ort_static(
    src: Path, dst: Path, calib: list[dict[str, np.ndarray]], op_types: list[str] | None
) -> dict[str, Any]:
    def go() -> None:
        ortq.quantize_static(
            str(src),
            str(dst),
            ListReader(calib),
            quant_format=ortq.QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=ortq.CalibrationMethod.MinMax,
            op_types_to_quantize=op_types,
        )

    _, secs = timed(go)
    return {"quant_s": secs}


def quantize_ort_dynamic(src: Path, dst: Path, per_channel: bool) -> dict[str, Any]:
    def go() -> None:
        ortq.quantize_dynamic(str(src), str(dst), weight_type=ortq.QuantType.QInt8, per_channel=per_channel)

    _, secs = timed(go)
    return {"quant_s": secs}


# ----------------------------------------------------------------------------- error budget


def fake_quant_variant(model: onnx.ModelProto, keep: Callable[[str], bool]) -> onnx.ModelProto:
    """A float copy of a QDQ model that keeps only part of its quantization, for error attribution.

    Weight DequantizeLinear nodes (fed by an initializer) are folded into float initializers
    holding the dequantized weights, so every linear runs as a float MatMul on exactly the
    quantized weight values (no integer kernel, and no ORT DQ->MatMulNBits fusion, whose default
    accuracy_level 4 would quantize the activations on its own). Activation QuantizeLinear ->
    DequantizeLinear pairs are kept when ``keep(producer op type)`` holds, else cut out.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    rewire: dict[str, str] = {}
    drop = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 else 0.0
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if q.ndim:
                shape[axis % q.ndim] = -1

            def along_axis(a: np.ndarray | float, shape: list[int] = shape) -> np.ndarray | float:
                return np.reshape(a, shape) if np.ndim(a) == 1 else a  # per-axis params, or one scalar

            w = (q - along_axis(zp)) * along_axis(scale)
            name = n.output[0] + "_fake_quant"
            graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
            rewire[n.output[0]] = name
            drop.append(n)
        elif n.input[0] in q_input:
            x = q_input[n.input[0]]
            if not keep(producer.get(x, "graph input")):
                rewire[n.output[0]] = x
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rewire:
                n.input[i] = rewire[name]
    return m


def error_budget(
    path: Path, ref: np.ndarray, evals: Sequence[dict[str, np.ndarray]], work: Path
) -> dict[str, float]:
    """1 - mean cosine vs FP32 of fake-quantized variants of a QDQ model.

    The weights are always quantized; the activations only at one kind of site at a time, the
    sites grouped by the op producing the activation (for BERT: LayerNormalization = Q/K/V and
    FFN-up inputs, Reshape = attention context into the output projection, Mul = GELU output
    into FFN-down). Last, everything fake-quantized. The site entries minus the weights-only
    entry roughly add up to the whole.
    """
    model = onnx.load(str(path))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    kinds = sorted({producer.get(n.input[0], "graph input") for n in q_nodes})
    variants = [("weights only", lambda _p: False)]
    variants += [(f"weights + activations after {k}", lambda p, k=k: p == k) for k in kinds]
    variants += [("weights + all activations (fake-quant)", lambda _p: True)]
    out = {}
    for label, keep in variants:
        tmp = work / "ablation.onnx"
        onnx.save(fake_quant_variant(model, keep), str(tmp))
        out[label] = 1.0 - zoo.embedding_agreement(ref, embed(session(tmp), evals))["mean_cosine"]
    return out


# ----------------------------------------------------------------------------- report


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "intra_op_num_threads": THREADS,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "qpass": getattr(qpass, "__version__", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _budget_order(label: str) -> tuple[int, str]:
    rank = {"weights only": 0, "the quantized model (integer kernels)": 3}.get(label)
    return (rank if rank is not None else 2 if label.startswith("weights + all") else 1, label)


def markdown(res: dict[str, Any]) -> str:
    m, cfg = res["machine"], res["config"]
    pre = res["ort_preprocess"]
    if pre["used"]:
        how = "with its defaults" if not pre["options"] else f"with {pre['options']}"
        pre_line = f"used, {how} ({pre['seconds']:.1f} s, not counted in the ORT quantization times)"
        if pre["errors"]:
            pre_line += f"; the default call failed: {pre['errors'][0].split(': ', 1)[1]}"
    else:
        pre_line = "FAILED, the ORT quantizers got the raw export: " + "; ".join(pre["errors"])
    lines = [
        "# MiniLM (all-MiniLM-L6-v2 embedder): qpass vs ONNX Runtime quantizers",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores; onnxruntime {m['onnxruntime']} "
        f"(CPUExecutionProvider, intra_op_num_threads={m['intra_op_num_threads']}); torch {m['torch']}; "
        f"date {m['date']}.",
        "",
        f"Calibration: the same {cfg['n_calib']} sentences of `zoo.sentences('calib')` for all; qpass gets "
        f"batches of {CALIB_BATCH} (padded to the longest sentence, padding masked), ORT "
        f"{cfg['ort_calib_batch']} sentence(s) per feed (ORT's calibrators cannot mask padding). "
        f"Evaluation: {cfg['n_eval']} sentences of "
        "`zoo.sentences('eval')` (disjoint from calibration). Latency: sequence length "
        f"{cfg['seq_len']}, {cfg['warmup']} warm-up runs then the median of {cfg['runs_b1']} (batch 1) / "
        f"{cfg['runs_b32']} (batch 32) interleaved runs, thread spinning off; ratio = model / FP32 "
        f"(lower is faster). Load average before / after timing: {cfg['load_before']} / {cfg['load_after']} "
        "(above ~0 means other processes shared the cores: absolute times are then noisy, ratios less so).",
        "",
        f"ORT `quant_pre_process`: {pre_line}.",
        "",
        "Quantization time is the wall time of the quantizer call on this machine (qpass: `quantize_file` "
        "including its verification runs and calibration; ORT static: calibration included).",
        "",
        "| model | mean cos | min cos | NN agree | size MB | latency b1 (ratio) | latency b32 (ratio) "
        "| quant time s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        if r.get("error"):
            lines.append(f"| {name} | failed: {r['error'].splitlines()[0][:80]} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {_fmt(r['mean_cosine'], '.4f')} | {_fmt(r['min_cosine'], '.4f')} "
            f"| {_fmt(r['nn_agreement'], '.3f')} | {r['size_mb']:.1f} "
            f"| {r['latency_ms_b1']:.1f} ms ({r['ratio_b1']:.2f}) "
            f"| {r['latency_ms_b32']:.0f} ms ({r['ratio_b32']:.2f}) | {_fmt(r.get('quant_s'), '.1f')} |"
        )
    lines += ["", "Quantized ops in each file (before ONNX Runtime's graph optimisations):", ""]
    for name, r in res["models"].items():
        if not r.get("error") and name != "fp32":
            ops = ", ".join(f"{k} {v}" for k, v in r["quant_ops"].items()) or "none"
            lines.append(f"- {name}: {ops}")
    lines += ["", "Kernels ONNX Runtime runs after its graph optimisations (quantized ops only):", ""]
    for name, r in res["models"].items():
        if not r.get("error") and name != "fp32":
            ops = ", ".join(f"{k} {v}" for k, v in r["runtime_quant_ops"].items()) or "none"
            lines.append(f"- {name}: {ops}")
    lines += [
        "",
        "Where the error of the static QDQ models comes from: 1 - mean cosine vs FP32 of float variants "
        "of the quantized file "
        "(weights dequantized to float initializers; activation Q/DQ kept only at the sites after the "
        "named op, the other activations in float):",
        "",
    ]
    budgets = {n: r["error_budget"] for n, r in res["models"].items() if r.get("error_budget")}
    if budgets:
        labels = sorted({k for b in budgets.values() for k in b}, key=_budget_order)
        lines += ["| sites | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for label in labels:
            cells = " | ".join(_fmt(b.get(label), ".5f") for b in budgets.values())
            lines.append(f"| {label} | {cells} |")
    lines += ["", f"Total benchmark time: {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    embedder, tok = zoo.load_minilm_embedder()
    fp32 = work / "minilm_fp32.onnx"
    _, export_s = timed(lambda: zoo.export_minilm_onnx(fp32, embedder=embedder, tokenizer=tok))
    log.info("exported %s in %.1f s", fp32, export_s)

    calib_sents = zoo.sentences("calib", args.n_calib)
    calib = zoo.minilm_batches(tok, calib_sents, CALIB_BATCH, MAX_LEN)
    # ORT's calibrators cannot skip padded positions (qpass drops them via attention_mask), so by
    # default ORT gets the same sentences one per feed, unpadded
    ort_calib = zoo.minilm_batches(tok, calib_sents, args.ort_calib_batch, MAX_LEN)
    eval_sents = zoo.sentences("eval", min(args.n_eval, len(zoo.sentences("eval"))))
    evals = zoo.minilm_batches(tok, eval_sents, EVAL_BATCH, MAX_LEN)

    models: dict[str, dict[str, Any]] = {"fp32": {"path": fp32, "quant_s": None}}
    jobs: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("qpass w8a8", lambda dst: quantize_qpass(fp32, dst, "w8a8", calib)),
        ("qpass w8a8-smooth", lambda dst: quantize_qpass(fp32, dst, "w8a8-smooth", calib)),
    ]
    with working_dir(work):
        pre = preprocess_for_ort(fp32, work / "minilm_fp32.pre.onnx")
    ort_in = Path(pre["input"])
    jobs += [
        ("ORT static (defaults)", lambda dst: quantize_ort_static(ort_in, dst, ort_calib, None)),
        ("ORT static (MatMul/Gemm)", lambda dst: quantize_ort_static(ort_in, dst, ort_calib, MATMUL_GEMM)),
        ("ORT dynamic (QInt8)", lambda dst: quantize_ort_dynamic(ort_in, dst, per_channel=False)),
        ("ORT dynamic (QInt8, per_channel)", lambda dst: quantize_ort_dynamic(ort_in, dst, per_channel=True)),
    ]
    for i, (name, job) in enumerate(jobs):
        dst = work / f"minilm_q{i}.onnx"
        log.info("quantizing: %s", name)
        try:
            with working_dir(work):
                models[name] = {"path": dst, **job(dst)}
        except Exception as exc:  # noqa: BLE001 - one failed quantizer must not sink the comparison
            log.warning("%s failed: %s", name, exc)
            models[name] = {"path": dst, "error": traceback.format_exc(limit=3)}
        else:
            log.info("  %.1f s", models[name]["quant_s"])

    # accuracy
    ok = {n: r for n, r in models.items() if not r.get("error")}
    sessions = {}
    for name, r in ok.items():
        try:
            sessions[name] = session(r["path"])
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot load is a result
            r["error"] = f"onnxruntime cannot load it: {type(exc).__name__}: {exc}"
    ok = {n: r for n, r in ok.items() if not r.get("error")}
    ref = embed(sessions["fp32"], evals)
    for name, r in ok.items():
        q = embed(sessions[name], evals)
        r.update(zoo.embedding_agreement(ref, q))
        r["size_mb"] = os.path.getsize(r["path"]) / 1e6
        r["quant_ops"] = quant_ops(op_histogram(r["path"]))
        opt = work / f"opt_{abs(hash(name))}.onnx"
        session(r["path"], optimized_path=opt)
        r["runtime_quant_ops"] = quant_ops(op_histogram(opt))
        log.info("%s: %s", name, {k: round(r[k], 4) for k in ("mean_cosine", "min_cosine", "nn_agreement")})
        if r["quant_ops"].get("QuantizeLinear"):  # static QDQ models
            try:
                r["error_budget"] = error_budget(r["path"], ref, evals, work)
            except Exception as exc:  # noqa: BLE001 - a diagnostic, not a result: never sink the run
                log.warning("error budget of %s failed: %s", name, exc)
            else:
                r["error_budget"]["the quantized model (integer kernels)"] = 1.0 - r["mean_cosine"]

    # latency
    live = {n: sessions[n] for n in ok}
    b1 = fixed_length_feed(tok, eval_sents[:1], args.seq_len)
    b32 = fixed_length_feed(tok, (eval_sents * 32)[:32], args.seq_len)
    load_before = _loadavg()
    log.info("timing batch 1 ...")
    t1 = time_interleaved(live, b1, args.warmup, args.runs_b1)
    log.info("timing batch 32 ...")
    t32 = time_interleaved(live, b32, args.warmup, args.runs_b32)
    load_after = _loadavg()
    for name, r in ok.items():
        r["latency_ms_b1"], r["latency_ms_b32"] = t1[name], t32[name]
        r["ratio_b1"], r["ratio_b32"] = t1[name] / t1["fp32"], t32[name] / t32["fp32"]

    for r in models.values():
        r["path"] = r["path"].name
    return {
        "machine": machine(),
        "config": {
            "n_calib": args.n_calib,
            "n_eval": len(eval_sents),
            "calib_batch": CALIB_BATCH,
            "ort_calib_batch": args.ort_calib_batch,
            "max_len": MAX_LEN,
            "seq_len": args.seq_len,
            "warmup": args.warmup,
            "runs_b1": args.runs_b1,
            "runs_b32": args.runs_b32,
            "export_s": export_s,
            "load_before": load_before,
            "load_after": load_after,
        },
        "ort_preprocess": {k: v for k, v in pre.items() if k != "input"},
        "models": models,
        "total_s": time.perf_counter() - t_start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-calib", type=int, default=128, help="calibration sentences (default 128)")
    p.add_argument("--n-eval", type=int, default=512, help="evaluation sentences (at most the split)")
    p.add_argument(
        "--ort-calib-batch",
        type=int,
        default=1,
        help="sentences per ORT calibration feed (default 1: no padding, which ORT cannot mask)",
    )
    p.add_argument("--seq-len", type=int, default=64, help="fixed sequence length for timing (default 64)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs per model and batch size")
    p.add_argument("--runs-b1", type=int, default=40, help="timed runs at batch 1 (default 40)")
    p.add_argument("--runs-b32", type=int, default=12, help="timed runs at batch 32 (default 12)")
    p.add_argument("--workdir", type=Path, default=None, help="keep .onnx files here (default: temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = p.parse_args(argv)
    # INFO from this script only (ORT's quantizer and qpass log every site at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(THREADS)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        res = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="minilm_vs_ort_") as tmp:
            res = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_vs_ort.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    md = markdown(res)
    (args.out / "minilm_vs_ort.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
