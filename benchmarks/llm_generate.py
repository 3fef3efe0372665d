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
    .venv/bin/python -P benchmarks/llm_generate.py smollm2 --peers   # then torchao / llm-compressor
Results go to benchmarks/results/llm_generate_<model>.md, with the machine load beside them. The
measurements themselves live in `lm_measure.py`, shared with `llm_peers.py`: `--peers` writes the
FP32 model as a transformers folder and the exact token rows under `--peers-data`, then runs
`llm_peers.py` in the peers' venv (`benchmarks/peers_install.sh`; it never imports qpass) in the same
invocation (`--peers-only`: only that part).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_measure import (  # noqa: E402  (the shared measurements, also run by llm_peers.py)
    CALIB_LEN,
    CALIB_ROWS,
    EVAL_LEN,
    EVAL_ROWS,
    NEW_TOKENS,
    PROMPT_TOKENS,
    TABLE_HEADER,
    load_text,
    measure,
    table_row,
)

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402

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
OUT = Path(__file__).resolve().parent / "results"
PEERS_PYTHON = "/work/peers-venv/bin/python"  # benchmarks/peers_install.sh
PEERS_DATA = "/work/peers-data"


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


def load(name: str):
    # the cached instance (read-only here): qpass.quantize quantizes its own copy
    model, tok = (
        zoo.load_smollm2(copy_model=False) if name == "smollm2" else zoo.load_qwen25(copy_model=False)
    )
    model.config.use_cache = True  # the zoo's SmolLM2 loader turns it off for graph capture
    return model, tok


def write_peer_inputs(name: str, model, tok, data: Path) -> Path:
    """What `llm_peers.py` (another venv, no qpass) reads: the FP32 model as a transformers folder
    (`save_pretrained` refuses GGUF-loaded models: the state dict goes into a model built from the
    config; written once, reused when present) and the exact token rows this run uses.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from qpass.lm_inputs import token_rows

    folder = data / name
    fp32 = folder / "fp32"
    if not (fp32 / "config.json").is_file():
        config = copy.deepcopy(model.config)
        config.use_cache = True
        if hasattr(
            config, "quantization_config"
        ):  # the GGUF loader's {"quant_method": "gguf"}: the copy is FP32
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(fp32)
        tok.save_pretrained(fp32)
        del fresh
    calib = torch.cat(token_rows(zoo.text_corpus("calib"), tok, CALIB_LEN, CALIB_ROWS))  # what quantize sees
    tensors = {
        "eval_rows": zoo.packed_token_rows(tok, "eval", EVAL_LEN, n_rows=EVAL_ROWS),
        "prompt": zoo.packed_token_rows(tok, "eval", PROMPT_TOKENS, n_rows=1),
        "calib_rows": calib,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "tokens.safetensors"))
    return folder


def run_peers(name: str, model, tok, data: Path, python: str) -> int:
    """llm_peers.py in the peers' venv, on the inputs written here; its own results files."""
    write_peer_inputs(name, model, tok, data)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [python, str(Path(__file__).resolve().parent / "llm_peers.py"), name, "--data", str(data)]
    print("peers:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode


def main(
    name: str,
    peers: str = "no",
    data: Path = Path(PEERS_DATA),
    python: str = PEERS_PYTHON,
    recipes: list[str] | None = None,
) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load(name)
    if peers == "only":
        sys.exit(run_peers(name, model, tok, data, python))
    eval_rows = zoo.packed_token_rows(tok, "eval", EVAL_LEN, n_rows=EVAL_ROWS)
    prompt = zoo.packed_token_rows(tok, "eval", PROMPT_TOKENS, n_rows=1)
    calib = zoo.text_corpus("calib")
    rows = []
    fp_ppl = None
    for recipe in ["fp32", *(RECIPES if recipes is None else [r for r in recipes if r != "fp32"])]:
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
        m = measure(q, eval_rows, prompt)
        fp_ppl = fp_ppl or m["perplexity"]
        rows.append(
            table_row(
                recipe, qtime, m["perplexity"], fp_ppl, m["prefill_ms"], m["decode_tok_s"], m["decode_growth"]
            )
        )
        print(f"{name} {rows[-1]} load {load_text()}", flush=True)
        del q
    lines = [
        f"# `benchmarks/llm_generate.py {name}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, 2 threads, batch 1; "
        f"load average after the run {load_text()}.",
        f"Calibration: {CALIB_ROWS} packed rows x {CALIB_LEN} tokens of the 'calib' split; perplexity over "
        f"{EVAL_ROWS} x {EVAL_LEN} held-out tokens ('eval' split, disjoint). Prefill: {PROMPT_TOKENS} tokens. "
        f"Decode: {NEW_TOKENS} greedy steps on the model's cache (the quantized one for KV rows); "
        "growth = mean step 100-128 / mean step 1-28.",
        *(
            [
                f"Peers (torchao, llm-compressor) measured right after these rows by the same invocation: "
                f"`llm_peers_{name}.md`."
            ]
            if peers == "yes"
            else []
        ),
        "",
        *TABLE_HEADER,
        *rows,
    ]
    OUT.mkdir(exist_ok=True)
    # a subset of the rows (--recipes) does not replace the full table
    stem = f"llm_generate_{name}" + ("" if recipes is None else "_subset")
    if recipes is not None:
        lines[0] += f" --recipes {','.join(recipes)}"
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if peers == "yes":
        sys.exit(run_peers(name, model, tok, data, python))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", choices=["smollm2", "qwen25"])
    ap.add_argument("--peers", action="store_true", help="then run llm_peers.py in the peers' venv")
    ap.add_argument("--peers-only", action="store_true", help="only write the peers' inputs and run them")
    ap.add_argument(
        "--peers-data", type=Path, default=Path(PEERS_DATA), help="the peers' inputs (not committed)"
    )
    ap.add_argument("--peers-python", default=PEERS_PYTHON, help="the peers' venv python")
    ap.add_argument("--recipes", help=f"comma-separated subset of {RECIPES} (written to *_subset.md)")
    a = ap.parse_args()
    subset = a.recipes.split(",") if a.recipes else None
    main(
        a.model, "only" if a.peers_only else "yes" if a.peers else "no", a.peers_data, a.peers_python, subset
    )
