"""SmolLM2-135M through ONNX Runtime GenAI: the builder's own fp32 and int4 against qpass recipes
run on the builder's fp32 graph (like for like), in one run.

Rows: builder fp32; builder int4 at its defaults (RTN, block 32; on CPU its default
accuracy_level is 4: int8 compute of A); builder int4 with k-quant; qpass `w4a16-gptq` at the
builder's block size (32) with accuracy_level 4 (the same MatMulNBits compute) and with the
recipe's own lowering; qpass `w8a8-dynamic`, `w8a8-smooth-dynamic`, `w8a8-smooth` (static) and
`w4a8-rotate` (the QuaRot layout through the builder's Skip norms). For each:
- perplexity: teacher-forced in plain onnxruntime (prefill with an empty past) over held-out
  rows of the `eval` split, tokenized by the folder's tokenizer.json; qpass calibrates on the
  disjoint `calib` split (qpass.quantize(folder, ...) with text);
- prefill: median ms of og.Generator.append_tokens over a 128-token prompt (3 runs after a warm-up);
- decode: tokens/s over 128 greedy og.Generator steps after that prompt (after a warm-up run);
- size: the decoder's .onnx plus its external data.
2 threads (og session options and ORT), batch 1; the load average is recorded beside the times.
Usage::

    .venv/bin/python -P benchmarks/llm_onnx_genai.py [--work DIR] [--eval-rows 8] [--calib-rows 16]

Results: benchmarks/results/llm_onnx_genai.md (and .json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import qpass
from qpass.genai_feeds import GenAICalibration, text_rows
from qpass.genai_folder import load_genai_folder
from qpass.zoo.corpora import text_corpus

THREADS = 2
PROMPT, NEW = 128, 128
RESULTS = Path(__file__).resolve().parent / "results"


def load_text() -> str:
    a = os.getloadavg()
    return f"{a[0]:.2f} / {a[1]:.2f} / {a[2]:.2f}"


def smollm2_hf(folder: Path) -> Path:
    """SmolLM2-135M (fp32, de-quantised from the shipped GGUF) as a transformers folder."""
    if (folder / "config.json").is_file():
        return folder
    from qpass.zoo import load_smollm2

    model, tok = load_smollm2(copy_model=False)
    config = copy.deepcopy(model.config)  # transformers refuses to save a model loaded from GGUF as is
    config.use_cache = True
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build(hf: Path, out: Path, precision: str, *extra: str) -> tuple[Path, float | None]:
    """The builder's folder and its build seconds (None: already built by an earlier run)."""
    if (out / "genai_config.json").is_file():
        return out, None
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    if extra:
        cmd += ["--extra_options", *extra]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - start


def folder_mb(folder: Path) -> float:
    dec = load_genai_folder(folder).decoder
    files = [dec, *dec.parent.glob(dec.name + ".data")]
    return sum(f.stat().st_size for f in files) / 1e6


def perplexity(folder: Path, rows: list[np.ndarray]) -> float:
    """exp(mean NLL) of each row's next tokens, one prefill per row on an empty cache (plain ORT)."""
    import onnxruntime as ort

    from qpass.genai_feeds import DecoderFeeds

    info = load_genai_folder(folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(info.decoder), opts, providers=["CPUExecutionProvider"])
    feeds = DecoderFeeds(info)
    nll, count = 0.0, 0
    for row in rows:
        logits = sess.run([info.logits], feeds.step(row[:-1], None))[0][0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(row.size - 1), row[1:]].sum())
        count += row.size - 1
    return float(np.exp(nll / count))


def og_model(folder: Path):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    threads = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og.Model(config)


def speed(folder: Path, prompt: np.ndarray) -> tuple[float, float]:
    """(median prefill ms over `prompt`, decode tokens/s over NEW greedy steps) through og.Generator."""
    import onnxruntime_genai as og

    model = og_model(folder)

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.size + NEW, do_sample=False)
        return og.Generator(model, params)

    prefill = []
    for i in range(4):
        gen = generator()
        t = time.perf_counter()
        gen.append_tokens(prompt)
        if i:  # the first run is the warm-up
            prefill.append((time.perf_counter() - t) * 1e3)
        if i < 2:  # decode: a warm-up run, then the timed one
            t = time.perf_counter()
            steps = 0
            while not gen.is_done():
                gen.generate_next_token()
                steps += 1
            decode = steps / (time.perf_counter() - t)
    return statistics.median(prefill), decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qpass-llm-onnx-genai"))
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--calib-rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hf", type=Path, help="another transformers folder instead of SmolLM2 (a smoke run)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--only", nargs="*", help="qpass rows whose label contains one of these (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = args.hf or smollm2_hf(work / "hf")
    fp32, secs = build(hf, work / "builder-fp32", "fp32")
    info = load_genai_folder(fp32)
    eval_rows = text_rows(
        info, "\n".join(text_corpus("eval")), GenAICalibration(args.seq_len - 1, args.eval_rows)
    )
    prompt = eval_rows[0][:PROMPT].astype(np.int32)
    table: list[dict] = []

    built = work / "build_seconds.json"  # build times survive a re-run that only measures
    known = json.loads(built.read_text()) if built.is_file() else {}
    last = args.results / "llm_onnx_genai.json"  # or, for older work folders, the last results
    earlier = {r["model"]: r["build_s"] for r in json.loads(last.read_text())} if last.is_file() else {}

    def measure(label: str, folder: Path, secs: float | None) -> None:
        """One row: measured at once and the table rewritten, so a cut-short run keeps its rows."""
        if secs is None:
            secs = known.get(folder.name, earlier.get(label))
        else:
            known[folder.name] = secs
            built.write_text(json.dumps(known, indent=1))
        ppl = perplexity(folder, eval_rows)
        load_before = load_text()
        prefill_ms, tok_s = speed(folder, prompt)
        row = {"model": label, "ppl": ppl, "prefill_ms": prefill_ms, "decode_tok_s": tok_s}
        row |= {"mb": folder_mb(folder), "build_s": secs, "load": f"{load_before} -> {load_text()}"}
        table.append(row)
        print(json.dumps(row), flush=True)
        write(table, args)

    measure("GenAI builder fp32", fp32, secs)
    for label, name, extra in (
        ("GenAI builder int4 (defaults: RTN, block 32, accuracy_level 4)", "builder-int4", ()),
        (
            "GenAI builder int4 k_quant (block 32, accuracy_level 4)",
            "builder-int4-kquant",
            ("algo_config=k_quant",),
        ),
    ):
        measure(label, *build(hf, work / name, "int4", *extra))
    calib = text_corpus("calib")
    g32 = qpass.get_recipe("w4a16-gptq").to_dict()
    g32["weights"]["group"] = 32
    g32_acc4 = json.loads(json.dumps(g32))
    g32_acc4.setdefault("lowering", {})["accuracy_level"] = 4
    g32["name"], g32_acc4["name"] = "w4a16-gptq-g32", "w4a16-gptq-g32-acc4"
    for label, recipe in (
        ("qpass w4a16-gptq g32, accuracy_level 4", g32_acc4),
        ("qpass w4a16-gptq g32 (recipe's lowering)", g32),
        ("qpass w8a8-dynamic", "w8a8-dynamic"),
        ("qpass w8a8-smooth-dynamic", "w8a8-smooth-dynamic"),
        ("qpass w8a8-smooth (static)", "w8a8-smooth"),
        ("qpass w4a8-rotate (QuaRot layout, GPTQ)", "w4a8-rotate"),
    ):
        if args.only and not any(o in label for o in args.only):
            continue
        out = work / f"qpass-{recipe if isinstance(recipe, str) else recipe['name']}"
        secs = None
        if not (out / "genai_config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            calib_opts = {"seq_len": args.seq_len - 1, "max_rows": args.calib_rows}
            t = time.perf_counter()
            qpass.quantize(str(fp32), recipe, calib, output_dir=out, **calib_opts)
            secs = time.perf_counter() - t
        measure(label, out, secs)


def write(table: list[dict], args: argparse.Namespace) -> None:
    import onnxruntime as ort
    import onnxruntime_genai as og

    base = table[0]["ppl"]
    lines = [
        "# SmolLM2-135M through ONNX Runtime GenAI: builder fp32/int4 vs qpass on the builder's fp32 graph",
        "",
        f"`benchmarks/llm_onnx_genai.py` (onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}), "
        f"CPU, {THREADS} threads, batch 1. Perplexity: {args.eval_rows} held-out rows of {args.seq_len} tokens "
        "(`eval` split), plain onnxruntime prefill; qpass calibrates on "
        f"{args.calib_rows} rows of the disjoint `calib` split (prefill + decode programs each). "
        f"Prefill: median ms of og `append_tokens` over {PROMPT} tokens; decode: tokens/s over {NEW} greedy "
        "og.Generator steps. Other jobs shared the 2 cores; the load average (1/5/15 min) before -> after "
        "each timing is beside it.",
        "",
        "Build s: the builder's or qpass's time to write the folder (an earlier run's, when that run built"
        " it and this one only measured).",
        "",
        "| model | perplexity | vs fp32 | prefill ms | decode tok/s | MB | build s | load |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        rel = "—" if r is table[0] else f"{(r['ppl'] / base - 1) * 100:+.1f}%"
        build = "—" if r["build_s"] is None else f"{r['build_s']:.0f}"
        lines.append(
            f"| {r['model']} | {r['ppl']:.3f} | {rel} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['mb']:.1f} | {build} | {r['load']} |"
        )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm_onnx_genai.md").write_text("\n".join(lines) + "\n")
    (args.results / "llm_onnx_genai.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
