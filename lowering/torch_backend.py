"""Torch lowering: a quantized linear becomes a module holding INT8 weight codes and scales.

CPU reference path: activations are fake-quantized (static per tensor or dynamic per token) and
the weight is dequantized; real integer kernels (Triton, torch._int_mm) come behind the same module.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from qpass.graph.view import OpRef
from qpass.qlinear import QLinear, canonical_weight, fake_quant_act


class QuantLinear(torch.nn.Module):
    """y = Q_a(x) @ dequant(W)^T + b: integer weight codes with per-channel or per-group scales.

    The codes, scales and zero points are the saved state; the dequantized weight is a cache.
    """

    def __init__(self, q: QLinear, weight_fp: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_codes", None if q.codes is None else q.codes.contiguous())
        self.register_buffer("weight_scales", None if q.scales is None else q.scales.contiguous())
        self.register_buffer(
            "weight_zero_points", None if q.zero_points is None else q.zero_points.contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight_g_idx", q.g_idx)
        w = weight_fp if q.codes is None else q.dequantized_weight()
        self.register_buffer("_weight", w.contiguous(), persistent=False)
        self.bits, self.group_size = q.bits, q.group_size
        self.act = q.act
        self.act_qparams = q.act_qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.act is not None:
            x = fake_quant_act(x.to(torch.float32), self.act, self.act_qparams)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return F.linear(x.to(torch.float32), self._weight, bias).to(dtype)

    def extra_repr(self) -> str:
        out, inp = self._weight.shape
        w = (
            "fp"
            if self.weight_codes is None
            else f"int{self.bits}/" + (f"g{self.group_size}" if self.group_size else "ch")
        )
        a = "fp" if self.act is None else f"{self.act.format} {self.act.granularity.value}"
        a += " dynamic" if self.act is not None and self.act.dynamic else ""
        return f"out={out}, in={inp}, weight={w}, act={a}"


def _module_name(op: OpRef) -> str:
    return "qlinear_" + re.sub(r"\W", "_", op.name)


def lower_linear_fx(view, op: OpRef, q: QLinear) -> None:
    """Replace one aten.linear / matmul node by a call to a QuantLinear submodule."""
    gm: fx.GraphModule = view.gm
    node = view.node(op)
    x = node.args[0]
    bias = view.read(q.weight.bias) if q.weight.bias is not None else None
    weight_fp = canonical_weight(view.read(q.weight.const), q.weight) if q.codes is None else None
    if q.has_corrections:  # LoRC / kept weights: extra float terms beside the quantized path
        from lowering.torch_corrections import CorrectedQuantLinear

        module = CorrectedQuantLinear(q, weight_fp, bias)
    else:
        module = QuantLinear(q, weight_fp, bias)
    name = _module_name(op)
    gm.add_module(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    old_attrs = [a for a in node.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
    gm.graph.erase_node(node)
    for attr in old_attrs:
        if not attr.users:
            target = str(attr.target)
            gm.graph.erase_node(attr)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _delete_attr(gm, target)
    view.dirty = True  # the adapter regenerates the code once, after the whole plan


def _delete_attr(gm: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, leaf):
        delattr(owner, leaf)
