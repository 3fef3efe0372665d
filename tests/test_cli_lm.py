"""`qpass quantize` on a transformers causal-LM folder writes a folder that `qpass generate` and
`qpass.load` run; the real CLI in a subprocess, a tiny random Llama with SmolLM2's tokenizer.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers as T

import qpass
from qpass import zoo

pytestmark = pytest.mark.slow  # SmolLM2's tokenizer, CLI subprocesses


def _qpass(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "qpass", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    _, tok = zoo.load_smollm2(copy_model=False)
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    T.LlamaForCausalLM(config).eval().save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    (root / "calib.txt").write_text("\n".join(zoo.text_corpus("calib")[:40]) + "\n")
    return root


def test_quantize_folder_then_generate(lm_folder):
    out = lm_folder / "q"
    res = _qpass(
        "quantize", str(lm_folder / "fp"), "-o", str(out), "--recipe", "w8a8-dynamic",
        "--calib", str(lm_folder / "calib.txt"), "--max-len", "64", "--quiet",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (out / "qpass_quantization.json").is_file() and (out / "tokenizer.json").is_file()
    res = _qpass("generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "6", "--quiet")
    assert res.returncode == 0, res.stderr
    tok = T.AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    model = qpass.load(out)
    expected = tok.decode(
        model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    )
    assert res.stdout.rstrip("\n") == expected


def test_output_over_the_input_is_refused(lm_folder):
    res = _qpass(
        "quantize", str(lm_folder / "fp"), "-o", str(lm_folder / "fp"), "--recipe", "w8a8-dynamic",
        "--calib", str(lm_folder / "calib.txt"),
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"qpass: error: {lm_folder / 'fp'}: the output folder is the input model; choose another"
    ]


def test_eval_lm_compares_the_folders(lm_folder):
    import json

    out = lm_folder / "q8"
    res = _qpass(
        "quantize", str(lm_folder / "fp"), "-o", str(out), "--recipe", "w8a8-dynamic",
        "--calib", str(lm_folder / "calib.txt"), "--max-len", "64", "--quiet",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = _qpass(
        "eval", str(lm_folder / "fp"), str(out), "--data", str(lm_folder / "calib.txt"),
        "--tokenizer", str(lm_folder / "fp"), "--task", "lm", "--max-len", "32", "--json", "--quiet",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    fp, q = doc["perplexity_fp"], doc["perplexity_quant"]
    assert fp > 1 and q > 1 and abs(q / fp - 1) < 0.05  # a random model: W8A8 barely moves it
