"""GPTQ on the real MiniLM: lower held-out layer-output error than RTN on nearly every linear."""

from __future__ import annotations

import pytest
import torch

from qpass import zoo
from qpass.formats import Granularity, QuantSpec
from qpass.formats.spec import ElementType
from qpass.quant.gptq import gptq
from qpass.quant.lorc import layer_error
from qpass.quant.rtn import rtn


def _hessians(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """X^T X of every nn.Linear input over the real (unmasked) tokens."""
    acc: dict[str, torch.Tensor] = {}
    rows: list[torch.Tensor] = []

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[rows[0]].to(torch.float64)
            acc[name] = acc.get(name, 0) + x.T @ x

        return fn

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(hook(n)) for n, m in mods]
    try:
        with torch.no_grad():
            for b in batches:
                rows[:] = [torch.from_numpy(b["attention_mask"]).reshape(-1).bool()]
                model(**{k: torch.from_numpy(v) for k, v in b.items()})
    finally:
        for h in handles:
            h.remove()
    return acc


@pytest.mark.slow
def test_gptq_beats_rtn_on_minilm_layers():
    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", 128), 32)
    held = zoo.minilm_batches(tok, zoo.sentences("eval", 64), 32)
    h_cal, h_held = _hessians(embedder.encoder, calib), _hessians(embedder.encoder, held)
    spec = QuantSpec(ElementType.INT4, Granularity.PER_GROUP, axis=-1, group_size=128, symmetric=True)
    wins, n = 0, 0
    for name, mod in embedder.encoder.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach()
        e_gptq = layer_error(w, gptq(w, h_cal[name].float(), spec).dequantized(), h_held[name])
        e_rtn = layer_error(w, rtn(w, spec).dequantized(), h_held[name])
        wins += e_gptq < e_rtn
        n += 1
    assert n == 36
    assert wins / n >= 0.9, f"GPTQ beat RTN on {wins}/{n} layers"
