"""Why RTN W4 weights lose accuracy under rotation on SmolLM2-135M: per-token output error of single layers.

SmolLM2's residual stream carries massive channels (507, 247: up to ~2e4) on a few "sink"
tokens, and the RMSNorm gammas on those channels are ~1e-4. For one layer at a time this
measures the relative output error sum((y_q - y)^2) / sum(y^2) of INT4 per-channel RTN weights
(activations in float) on the sink tokens and on the others:
- gate_proj after post_attention_layernorm: gamma unfused (the model as is), gamma fused into
  the weight (QuaRot's norm fusion), fused and rotated by a randomized Hadamard (QuaRot layout);
- down_proj: unrotated and with the online Hadamard before it.

    .venv/bin/python benchmarks/smollm2_rotation_diag.py     # -> results/smollm2_rotation_diag.md
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpass import zoo
from qpass.math.hadamard import randomized_hadamard
from qpass.qconfig import WeightQuantConfig
from qpass.quant.qlinear import weight_spec
from qpass.quant.rtn import rtn

OUT = Path(__file__).parent / "results" / "smollm2_rotation_diag.md"
LAYERS = (5, 10, 15, 25)


def _dq(w: torch.Tensor) -> torch.Tensor:
    return rtn(w, weight_spec(WeightQuantConfig(format="int4", symmetric=True))).dequantized()


def _err(y: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> str:
    e = (y - ref)[mask].pow(2).sum() / ref[mask].pow(2).sum()
    return f"{float(e):.3g}" if bool(mask.any()) else "—"


def main() -> None:
    torch.manual_seed(0)
    model, tok = zoo.load_smollm2(copy_model=False)
    rows = zoo.packed_token_rows(tok, "calib", 256, 2)
    cap: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i in LAYERS:
        layer = model.model.layers[i]
        for key, mod in (("norm", layer.post_attention_layernorm), ("down", layer.mlp.down_proj)):
            hooks.append(
                mod.register_forward_hook(lambda m, a, o, k=(key, i): cap.__setitem__(k, a[0].detach()))
            )
    with torch.no_grad():
        model(rows)
    for h in hooks:
        h.remove()
    lines = [
        "# SmolLM2-135M: per-token error of INT4 per-channel RTN weights, one layer at a time",
        "",
        "2 calibration rows x 256 tokens; sink tokens = residual absmax > 20x the median token's.",
        "Relative output error sum((y_q - y)^2) / sum(y^2), activations in float.",
        "",
        "| layer | sink tokens | gate: gamma unfused | gate: gamma fused | gate: fused + Hadamard "
        "| down: as is | down: online Hadamard |",
        "|---|---:|---|---|---|---|---|",
    ]
    q576 = randomized_hadamard(576, 0).float()
    q1536 = randomized_hadamard(1536, 0).float()
    for i in LAYERS:
        layer = model.model.layers[i]
        x = cap["norm", i].reshape(-1, 576)
        peak = x.abs().amax(-1)
        sink = peak > 20 * peak.median()
        xh = x / (x.pow(2).mean(-1, keepdim=True) + layer.post_attention_layernorm.variance_epsilon).sqrt()
        g = layer.post_attention_layernorm.weight.detach()
        w = layer.mlp.gate_proj.weight.detach()
        ref = (xh * g) @ w.T
        gate = [(xh * g) @ _dq(w).T, xh @ _dq(w * g).T, (xh @ q576) @ _dq((w * g) @ q576).T]
        xd = cap["down", i].reshape(-1, 1536)
        wd = layer.mlp.down_proj.weight.detach()
        refd = xd @ wd.T
        down = [xd @ _dq(wd).T, (xd @ q1536) @ _dq(wd @ q1536).T]
        cells = [
            " / ".join(_err(y, r, m) for m in (sink, ~sink))
            for y, r in [*((y, ref) for y in gate), *((y, refd) for y in down)]
        ]
        lines.append(f"| {i} | {int(sink.sum())} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: sink tokens / other tokens.", ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
