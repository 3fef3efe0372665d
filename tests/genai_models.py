"""Tiny ONNX Runtime GenAI folders for tests: random-weight Llama / Qwen2 decoders from transformers'
own config classes, run through the GenAI model builder (fp32, CPU), offline.

The tokenizer is a 512-token byte-level BPE trained here on the standard library's text (seconds,
no download); the builder copies it into the folder, where og.Tokenizer and qpass's text
calibration both read it. Weights are drawn wider than transformers' init (norm gammas around 1,
non-zero biases) so norms, biases and smoothing have something to act on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 512


def train_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qpass.zoo.corpora import text_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text_corpus("calib")[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if p.dim() == 1 else 0.08))


def tiny_hf_model(arch: str, folder: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide decoder (4 heads, 2 KV heads: GQA) saved with the tokenizer folder's files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen2":  # q/k/v projections with biases
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        raise ValueError(arch)
    _randomize(model.eval(), seed)
    model.save_pretrained(folder)
    for item in tokenizer.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


def _builder_cmd(hf_dir: Path, out: Path, precision: str) -> list[str]:
    """`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION -e cpu -c CACHE`."""
    cmd = [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    return [*cmd, "-p", precision, "-e", "cpu", "-c", str(out.parent / f"{out.name}.cache")]


def run_builders(jobs: list[tuple[Path, Path, str]]) -> list[Path]:
    """The builder on each (hf_dir, out, precision), all at once (each is mostly its own imports), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            _builder_cmd(*job), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        for job in jobs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            msg = f"GenAI builder failed ({proc.returncode}): {err[-2000:]}"
            raise RuntimeError(msg)
    return [out for _, out, _ in jobs]


def tiny_genai_folders(archs: tuple[str, ...], root: Path) -> dict[str, Path]:
    """The builder's fp32 folder for each tiny `arch` decoder, under `root`."""
    train_tokenizer(root / "tokenizer")
    jobs = [
        (tiny_hf_model(a, root / f"hf_{a}", root / "tokenizer"), root / f"genai_{a}", "fp32") for a in archs
    ]
    return dict(zip(archs, run_builders(jobs), strict=True))
