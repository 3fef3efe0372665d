"""The causal-LM measurements shared by `llm_generate.py` (qpass's rows, main venv) and `llm_peers.py`
(torchao and llm-compressor, their own venv): they need only torch and transformers, so both venvs
run the same code on the same token rows.

- prefill: median ms of one forward over the prompt (3 runs after a warm-up);
- decode: NEW_TOKENS greedy steps fed one token each on the model's cache (after 8 warm-up steps on
  another cache); tokens/s over all of them, and the growth ratio mean(step 100..128) /
  mean(step 1..28) (flat cost: ~1);
- perplexity: teacher-forced over held-out rows, fed 16 tokens at a time through the model's cache.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

PROMPT_TOKENS, NEW_TOKENS, EVAL_ROWS, EVAL_LEN = 128, 128, 8, 256
CALIB_ROWS, CALIB_LEN = 32, 256

TABLE_HEADER = [
    "| recipe | quantize s | perplexity | vs FP32 | prefill ms | decode tok/s | decode growth |",
    "|---|---:|---:|---:|---:|---:|---:|",
]


def make_cache(model):
    """The cache generate() would use: a qpass recipe's quantized cache where the model has one
    (imported only then: the peers' venv never reaches it), else transformers' DynamicCache.
    """
    from transformers import DynamicCache

    kv = getattr(model, "qpass_kv_cache", None)
    if kv is not None:
        from qpass.lm_kv_cache import QuantizedKVCache

        return QuantizedKVCache(model.config, kv)
    return DynamicCache(config=model.config)


def ppl_through_cache(model, rows: torch.Tensor, chunk: int = 16) -> float:
    """Teacher-forced perplexity fed `chunk` tokens at a time through the model's own cache (its
    recipe's quantized cache where it has one): later chunks read the quantized past.
    """
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            x = row[None]
            cache = make_cache(model)
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


def prefill_ms(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def decode_steps(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[float]:
    """Seconds of each of `new_tokens` greedy steps on the model's own cache."""
    from transformers import DynamicCache

    steps = []
    with torch.no_grad():
        warm = model(input_ids=ids[:, :16], past_key_values=DynamicCache(config=model.config), use_cache=True)
        for _ in range(8):  # kernels pick their path on first use (the CPU int8 GEMM measures once)
            warm = model(
                input_ids=warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True
            )
        cache = make_cache(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
    return steps


def growth(steps: list[float]) -> float:
    """mean(step 100..128) / mean(step 1..28): ~1 when a decode step does not grow with the prefix."""
    return statistics.mean(steps[99:128]) / statistics.mean(steps[:28])


def measure(model, eval_rows: torch.Tensor, prompt: torch.Tensor) -> dict:
    """Perplexity through the cache, prefill ms, decode tokens/s and growth, and the load average
    read right after the timings.
    """
    ppl = ppl_through_cache(model, eval_rows)
    pre = prefill_ms(model, prompt)
    steps = decode_steps(model, prompt)
    return {
        "perplexity": ppl,
        "prefill_ms": pre,
        "decode_tok_s": len(steps) / sum(steps),
        "decode_growth": growth(steps),
        "loadavg": list(os.getloadavg()),
    }


def table_row(
    recipe: str, qtime: float, ppl: float, fp_ppl: float, pre: float, tps: float, grow: float
) -> str:
    return (
        f"| {recipe} | {qtime:.0f} | {ppl:.3f} | {100 * (ppl / fp_ppl - 1):+.1f}% | {pre:.0f} | "
        f"{tps:.1f} | {grow:.2f} |"
    )


def load_text() -> str:
    a = os.getloadavg()
    return f"{a[0]:.2f} / {a[1]:.2f} / {a[2]:.2f}"
