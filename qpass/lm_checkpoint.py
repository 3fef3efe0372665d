"""Save and load a quantized transformers LM as a folder: `config.json` (and the generation
config), `model.safetensors` holding the float parameters and every quantized linear's packed
codes, scales and corrections, and `qpass_quantization.json` naming the modules that are quantized
or wrapped with an online rotation, with the recipe. No pickle and no recalibration: loading builds
the model from its config, rebuilds each quantized module from its stored `QLinear`, and gives
bit-identical logits.

`model.save_pretrained(dir)` on a `qpass.quantize` result writes this folder too (the quantized
model's `save_pretrained` is bound to `save_lm`), and `qpass.load(dir)` reads it back.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qpass.errors import ModelLoadError
from qpass.io import atomic_folder
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear_state import qlinear_from_state, qlinear_to_state
from qpass.registry import PostRotated, PreRotated, Rotation, quant_module

MANIFEST = "qpass_quantization.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_Q = "qpass::"  # key prefix of a quantized linear's tensors: qpass::<module path>::<field>


def attach_saving(model: nn.Module) -> None:
    """Make `model.save_pretrained(dir)` write the qpass folder (what `qpass.load` reads)."""
    model.save_pretrained = types.MethodType(lambda self, directory, **_: save_lm(self, directory), model)


def save_lm(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model` (a `qpass.quantize` result) to `directory`, atomically (a full folder or none)."""
    directory = Path(directory)
    quantized: dict[str, Any] = {}
    wrappers: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    for path, module in model.named_modules():
        q = getattr(module, "qpass_qlinear", None)
        if q is not None:
            meta, qt = qlinear_to_state(q)
            bias = getattr(module, "bias", None)
            if bias is not None:
                qt["bias"] = bias
            if linear_form(q) is LinearForm.FLOAT_WEIGHT:  # only the activation is quantized
                qt["weight_fp"] = module._weight
            if getattr(module, "rotation_signs", None) is not None:
                qt["rotation_signs"] = module.rotation_signs
            meta["tensors"] = sorted(qt)
            quantized[path] = meta
            tensors.update({f"{_Q}{path}::{k}": v.detach().contiguous() for k, v in qt.items()})
            skip.add(path + ".")
        elif isinstance(module, (PreRotated, PostRotated)):
            wrappers[path] = "pre" if isinstance(module, PreRotated) else "post"
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if any(name.startswith(p) for p in skip):
            continue
        key = (value.data_ptr(), tuple(value.shape), value.dtype)
        if key in seen:  # a tied tensor: stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().contiguous()
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "recipe": getattr(model, "qpass_recipe", None),
        "quantized": quantized,
        "wrappers": wrappers,
        "tied": aliases,
    }
    with atomic_folder(directory) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "qpass"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_lm(directory: str | os.PathLike) -> nn.Module:
    """The model `save_lm` wrote, ready to `generate()`."""
    directory = Path(directory)
    for name in (MANIFEST, WEIGHTS, "config.json"):
        if not (directory / name).is_file():
            msg = f"{directory}: not a qpass model folder (no {name})"
            raise ModelLoadError(msg)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        msg = f"{directory / MANIFEST}: not valid JSON ({exc})"
        raise ModelLoadError(msg) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        msg = f"{directory / MANIFEST}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        raise ModelLoadError(msg)
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    stored = load_file(str(directory / WEIGHTS))
    for path, kind in sorted(manifest["wrappers"].items(), key=lambda kv: kv[0].count(".")):
        rotation = Rotation(stored.get(f"{path}.signs"), stored.get(f"{path}.matrix"))
        _replace(
            model, path, lambda m, r=rotation, k=kind: PreRotated(r, m) if k == "pre" else PostRotated(m, r)
        )
    for path, meta in manifest["quantized"].items():
        qt = {k: stored[f"{_Q}{path}::{k}"] for k in meta["tensors"]}
        q = qlinear_from_state(meta, qt, f"{directory}: module '{path}'")
        module = quant_module(q, qt.get("weight_fp"), qt.get("bias"), path)
        module.qpass_qlinear = q
        if "rotation_signs" in qt:
            module.rotation_signs = qt["rotation_signs"].clone()
        _replace(model, path, lambda _m, new=module: new)
    state = {k: v for k, v in stored.items() if not k.startswith(_Q)}
    for alias, name in manifest["tied"].items():
        state[alias] = state[name]
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantized = tuple(p + "." for p in manifest["quantized"])
    missing = [k for k in missing if not k.startswith(quantized)]
    if missing or unexpected:
        msg = f"{directory / WEIGHTS}: parameters missing {missing[:3]} / unexpected {unexpected[:3]}"
        raise ModelLoadError(msg)
    model.qpass_recipe = manifest["recipe"]
    attach_saving(model)
    kv = (manifest["recipe"] or {}).get("kv_cache")
    if kv is not None:  # the recipe's cache quantization comes back with the model
        from qpass.config import from_mapping
        from qpass.lm_kv_cache import attach_kv_cache
        from qpass.qconfig import KVCacheConfig

        attach_kv_cache(model, from_mapping(KVCacheConfig, kv, "kv_cache"))
    return model


def _replace(model: nn.Module, path: str, build: Any) -> None:
    parent_path, _, child = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, child)
    except AttributeError as exc:
        msg = f"module '{path}' named in {MANIFEST} does not exist in {type(model).__name__}"
        raise ModelLoadError(msg) from exc
    setattr(parent, child, build(old))


save = save_lm  # qpass.save(model, dir)
load = load_lm  # qpass.load(dir)
