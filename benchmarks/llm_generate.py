"""Quantized transformers LMs that still generate: prefill, decode speed and its growth with the
prefix, held-out perplexity, for each recipe, measured in one run per model.

Each recipe goes through `qpass.quantize(model, recipe, calibration=text, tokenizer=tok)`: the
result is the same transformers class, quantized in its modules, decoding on its own KV cache.
- prefill: median ms of one forward over 128 prompt tokens (3 runs after a warm-up);
- decode: 128 greedy steps fed one token each on the model's cache (after 8 warm-up steps on
  another cache); tokens/s over all of
  them, and the growth ratio mean(step 100..128) / mean(step 1..28) (flat cost: ~1);
- perplexity: teacher-forced over held-out rows (`zoo.packed_token_rows(tok, "eval", 256)`), fed
  16 tokens at a time through the model's cache (the recipe's quantized cache for the KV rows),
  calibration from the disjoint "calib" split.
Batch 1, 2 threads. Usage::

    .venv/bin/python -P benchmarks/llm_generate.py smollm2      # or qwen25
Results go to benchmarks/results/llm_generate_<model>.md, with the machine load beside them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

import qpass
from qpass import zoo

RECIPES = [
    "w8a8-dynamic",
    "w8a8-smooth-dynamic",
    "w4a16-gptq",
    "w4a16-gptq+head-fp",
    "w4a8-rotate",
    "fp32+kv8",
    "fp32+kv4",
    "w8a8-smooth-dynamic+kv8",
    "w8a8-smooth-dynamic+kv4",
]
KV = {"kv8": {"format": "int8"}, "kv4": {"format": "int4", "rotate": "hadamard"}}


PROMPT_TOKENS, NEW_TOKENS, EVAL_ROWS, EVAL_LEN = 128, 128, 8, 256
CALIB_ROWS, CALIB_LEN = 32, 256
OUT = Path(__file__).resolve().parent / "results"


def recipe_for(name: str):
    """A built-in recipe, `<recipe>+head-fp` (the output head left float: `exclude: [output_head]`,
    to measure what quantizing a tied head costs), or `<recipe|fp32>+kv8|kv4` (the recipe's
    `kv_cache:` section: INT8, or INT4 with a Hadamard on K).
    """
    from qpass.recipe import get_recipe

    base, _, extra = name.partition("+")
    data = {"name": name} if base == "fp32" else {**get_recipe(base).to_dict(), "name": name}
    if extra == "head-fp":
        data["exclude"] = ["output_head"]
    elif extra in KV:
        data["kv_cache"] = KV[extra]
    return data


def ppl_through_cache(model, rows: torch.Tensor, chunk: int = 16) -> float:
    """Teacher-forced perplexity fed `chunk` tokens at a time through the model's own cache (its
    recipe's quantized cache where it has one): later chunks read the quantized past.
    """
    import math

    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            x = row[None]
            cache = _cache(model)
            logits = torch.cat(
                [
                    model(input_ids=x[:, i : i + chunk], past_key_values=cache, use_cache=True).logits
                    for i in range(0, x.shape[1], chunk)
                ],
                dim=1,
            )
            total += float(F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum").double())
            count += x.shape[1] - 1
    return math.exp(total / count)


def load(name: str):
    # the cached instance (read-only here): qpass.quantize quantizes its own copy
    model, tok = (
        zoo.load_smollm2(copy_model=False) if name == "smollm2" else zoo.load_qwen25(copy_model=False)
    )
    model.config.use_cache = True  # the zoo's SmolLM2 loader turns it off for graph capture
    return model, tok


def prefill_ms(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _cache(model):
    """The cache generate() would use: the recipe's quantized cache where it has one."""
    from transformers import DynamicCache

    from qpass.lm_kv_cache import QuantizedKVCache

    kv = getattr(model, "qpass_kv_cache", None)
    return QuantizedKVCache(model.config, kv) if kv is not None else DynamicCache(config=model.config)


def decode_steps(model, ids: torch.Tensor) -> list[float]:
    """Seconds of each of NEW_TOKENS greedy steps on the model's own cache."""
    from transformers import DynamicCache

    steps = []
    with torch.no_grad():
        warm = model(input_ids=ids[:, :16], past_key_values=DynamicCache(config=model.config), use_cache=True)
        for _ in range(8):  # kernels pick their path on first use (the CPU int8 GEMM measures once)
            warm = model(
                input_ids=warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True
            )
        cache = _cache(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(NEW_TOKENS):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
    return steps


def main(name: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load(name)
    eval_rows = zoo.packed_token_rows(tok, "eval", EVAL_LEN, n_rows=EVAL_ROWS)
    prompt = zoo.packed_token_rows(tok, "eval", PROMPT_TOKENS, n_rows=1)
    calib = zoo.text_corpus("calib")
    rows = []
    fp_ppl = None
    for recipe in ["fp32", *RECIPES]:
        t = time.perf_counter()
        if recipe == "fp32":
            q, qtime = model, 0.0
        else:
            q = qpass.quantize(
                model,
                recipe_for(recipe),
                calibration=calib,
                tokenizer=tok,
                seq_len=CALIB_LEN,
                max_rows=CALIB_ROWS,
            )
            qtime = time.perf_counter() - t
        ppl = ppl_through_cache(q, eval_rows)
        fp_ppl = fp_ppl or ppl
        pre = prefill_ms(q, prompt)
        steps = decode_steps(q, prompt)
        growth = statistics.mean(steps[99:128]) / statistics.mean(steps[:28])
        rows.append((recipe, qtime, ppl, 100 * (ppl / fp_ppl - 1), pre, NEW_TOKENS / sum(steps), growth))
        print(
            f"{name} {recipe}: ppl {ppl:.3f} prefill {pre:.0f} ms decode {rows[-1][5]:.1f} tok/s growth {growth:.2f}"
        )
        del q
    load_avg = os.getloadavg()
    lines = [
        f"# `benchmarks/llm_generate.py {name}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, 2 threads, batch 1; "
        f"load average after the run {load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f}.",
        f"Calibration: {CALIB_ROWS} packed rows x {CALIB_LEN} tokens of the 'calib' split; perplexity over "
        f"{EVAL_ROWS} x {EVAL_LEN} held-out tokens ('eval' split, disjoint). Prefill: {PROMPT_TOKENS} tokens. "
        f"Decode: {NEW_TOKENS} greedy steps on the model's cache (the quantized one for KV rows); "
        "growth = mean step 100-128 / mean step 1-28.",
        "",
        "| recipe | quantize s | perplexity | vs FP32 | prefill ms | decode tok/s | decode growth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, qtime, ppl, rel, pre, tps, growth in rows:
        lines.append(
            f"| {recipe} | {qtime:.0f} | {ppl:.3f} | {rel:+.1f}% | {pre:.0f} | {tps:.1f} | {growth:.2f} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / f"llm_generate_{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
