"""Export a quantized transformers LM as a compressed-tensors checkpoint: the layout vLLM serves and
llm-compressor writes, which plain transformers loads with the `compressed-tensors` library.

The quantization config and the packing are the library's own (`QuantizationConfig`,
`QuantizationArgs`, its pack-quantized / int-quantized compressors); qpass supplies the codes'
scales, zero points and act-order `g_idx`, so the checkpoint decodes to exactly qpass's weights.
- W4A16 (and other INTn weight-only): `pack-quantized`, group or channel strategy, `weight_g_idx`
  with `actorder: group` where GPTQ permuted the groups;
- W8A8 with dynamic per-token activations: `int-quantized`, per-channel weight scales.
Refused with the reason: online rotations (the format has no op for them), LoRC / kept weights /
LLM.int8 float parts, output-row groups, static activation ranges, float and block formats,
asymmetric sub-8-bit weights (they do not load back, see `_weight_args`), and a short last group
(compressed-tensors' groups must divide the input width: pick a group that does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qpass.errors import ConfigError
from qpass.io import atomic_folder
from qpass.qconfig import ActGranularity
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear
from qpass.registry import PostRotated, PreRotated


def _weight_args(q: QLinear, where: str) -> dict[str, Any]:
    form = linear_form(q, where)
    if form is not LinearForm.INTEGER:
        msg = f"module '{where}': {form.value} linears have no compressed-tensors form (integer weights only)"
        raise ConfigError(msg)
    if q.group_axis != "in":
        msg = f"module '{where}': groups along the output rows have no compressed-tensors form"
        raise ConfigError(msg)
    k = q.codes.shape[1]
    if q.zero_points is not None and q.zero_points.is_floating_point():
        msg = f"module '{where}': float zero points have no compressed-tensors form (integer zero points only)"
        raise ConfigError(msg)
    if q.zero_points is not None and q.bits < 8:
        # compressed-tensors packs zero points when compressing, but its loader builds the
        # compressed layout on the meta device without packing them ([out, groups] against the
        # file's [out / (32 / bits), groups]): transformers refuses such a checkpoint (measured with
        # compressed-tensors 0.20.1), so an asymmetric sub-8-bit export would not load
        msg = (
            f"module '{where}': asymmetric {q.bits}-bit weights do not load back from compressed-tensors "
            "(its loader expects unpacked zero points); export a symmetric recipe (e.g. w4a16-gptq)"
        )
        raise ConfigError(msg)
    args: dict[str, Any] = {"num_bits": q.bits, "type": "int", "symmetric": q.zero_points is None}
    if q.group_size is None or q.group_size >= k:
        args["strategy"] = "channel"
    else:
        if k % q.group_size:
            msg = (
                f"module '{where}': {k} input channels in groups of {q.group_size} leave a short last group, "
                "which compressed-tensors cannot hold; choose a group size that divides the width "
                f"(e.g. {_divisor_near(k, q.group_size)})"
            )
            raise ConfigError(msg)
        args.update(strategy="group", group_size=q.group_size)
        if q.g_idx is not None:
            args["actorder"] = "group"
    return args


def _divisor_near(k: int, g: int) -> int:
    return max(d for d in range(1, g + 1) if k % d == 0)


def _act_args(q: QLinear, where: str) -> dict[str, Any] | None:
    a = q.act
    if a is None:
        return None
    if a.format != "int8" or not a.dynamic or a.granularity is not ActGranularity.PER_TOKEN:
        msg = f"module '{where}': only dynamic per-token int8 activations export to compressed-tensors"
        raise ConfigError(msg)
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` (a `qpass.quantize` result) to `out_dir` as a compressed-tensors checkpoint."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    out_dir = Path(out_dir)
    for path, module in model.named_modules():
        if isinstance(module, (PreRotated, PostRotated)):
            msg = (
                f"module '{path}' carries an online rotation, which compressed-tensors cannot hold; "
                "export a recipe without online ops"
            )
            raise ConfigError(msg)
    quantized = {p: m for p, m in model.named_modules() if getattr(m, "qpass_qlinear", None) is not None}
    if not quantized:
        msg = "the model has no quantized linears to export (quantize it with qpass.quantize first)"
        raise ConfigError(msg)
    schemes = {}
    for path, module in quantized.items():
        q = module.qpass_qlinear
        if getattr(module, "rotation_signs", None) is not None:
            msg = f"module '{path}' fuses an online Hadamard into its quantizer; compressed-tensors cannot hold it"
            raise ConfigError(msg)
        schemes[path] = (
            json.dumps(_weight_args(q, path), sort_keys=True),
            json.dumps(_act_args(q, path), sort_keys=True),
        )
    kinds = sorted(set(schemes.values()))
    config_groups, fmt_of = {}, {}
    for i, (w, a) in enumerate(kinds):
        w_args, a_args = json.loads(w), json.loads(a)
        targets = ["Linear"] if len(kinds) == 1 else [p for p, s in schemes.items() if s == (w, a)]
        scheme = QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(**w_args),
            input_activations=None if a_args is None else QuantizationArgs(**a_args),
        )
        fmt = "int-quantized" if a_args is not None and w_args["num_bits"] == 8 else "pack-quantized"
        scheme.format = fmt
        config_groups[f"group_{i}"] = scheme
        fmt_of[(w, a)] = (scheme, fmt)
    formats = {f for _, f in fmt_of.values()}
    ignore = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        ignore=ignore,
        quantization_status="compressed",
    )
    tensors: dict[str, torch.Tensor] = {}
    prefixes = tuple(p + "." for p in quantized)
    seen: set[tuple] = set()
    for name, value in model.state_dict().items():
        key = (value.data_ptr(), tuple(value.shape))
        if name.startswith(prefixes) or key in seen:
            continue
        seen.add(key)
        tensors[name] = value.detach().contiguous()
    for path, module in quantized.items():
        q: QLinear = module.qpass_qlinear
        scheme, fmt = fmt_of[schemes[path]]
        compressor = BaseCompressor.load_from_registry(fmt)
        local = {"weight": q.dequantized_weight(), "weight_scale": q.scales.to(torch.float32)}
        if (
            q.zero_points is not None
        ):  # qpass: (code - zp) * s, codes in [0, 2^b); compressed-tensors: signed codes
            local["weight_zero_point"] = (q.zero_points.to(torch.int32) - (1 << (q.bits - 1))).to(torch.int8)
        if q.g_idx is not None:
            local["weight_g_idx"] = q.g_idx.to(torch.int32)
        for k, v in compressor.compress(local, scheme).items():
            tensors[f"{path}.{k}"] = v.contiguous()
        if getattr(module, "bias", None) is not None:
            tensors[f"{path}.bias"] = module.bias.detach().contiguous()
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False  # a quantized head cannot share the float embedding table
    config["quantization_config"] = qconfig.model_dump(mode="json")
    with atomic_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


EXPORT_FORMATS = ("compressed-tensors",)


def export(
    model: nn.Module, out_dir: str | os.PathLike, format: str = "compressed-tensors", tokenizer: Any = None
) -> Path:  # noqa: A002
    """`qpass.export(model, out_dir, format=...)`: a checkpoint another runtime loads."""
    if format not in EXPORT_FORMATS:
        msg = f"export format {format!r} is not supported; expected one of {EXPORT_FORMATS}"
        raise ConfigError(msg)
    return export_compressed_tensors(model, out_dir, tokenizer)
