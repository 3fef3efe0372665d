"""Torch lowering of a quantize plan: each quantized linear node becomes a call to its module
(`QuantLinear`, or the corrected / decomposed variants), chosen by `qpass.quant.linear_form`; then
the online rotations feeding per-token W8A8 modules are fused into their activation quantizer.

The module classes live beside their kernels (torch_backend, torch_corrections, torch_decompose);
this module is the only one that knows all of them, so they never import each other upward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

import qpass.kernels.hadamard  # noqa: F401 - registers the op fuse_rotations_into_quantize matches
from qpass.graph.fx import FxGraphView
from qpass.graph.refs import OpRef
from qpass.lowering.torch_backend import LinearKernel, QuantLinear
from qpass.lowering.torch_conv import QuantConv, conv_arguments
from qpass.lowering.torch_corrections import CorrectedQuantLinear
from qpass.lowering.torch_decompose import DecomposedQuantLinear
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear, QuantPlan, canonical_weight


def fuse_rotations_into_quantize(gm: fx.GraphModule) -> int:
    """Fold each online Hadamard (`qpass::hadamard_transform`) whose only reader is a per-token
    W8A8 QuantLinear into that module's activation quantizer (`quantize_per_token_hadamard`: one
    fused kernel on CUDA, the same references in sequence on CPU, so the result is unchanged).
    Power-of-two sizes only, as the fused kernel; returns how many were fused.
    """
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.qpass.hadamard_transform.default:
            continue
        src, signs_attr = node.args
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or signs_attr.op != "get_attr":
            continue
        module = gm.get_submodule(str(users[0].target))
        signs = getattr(gm, str(signs_attr.target), None)
        if not isinstance(module, QuantLinear) or module.kernel is not LinearKernel.W8A8_DYNAMIC:
            continue
        n = signs.numel() if signs is not None else 0
        if n == 0 or n & (n - 1) or module.rotation_signs is not None:
            continue
        module.rotation_signs = signs.detach().to(torch.float32).clone()
        users[0].replace_input_with(node, src)
        gm.graph.erase_node(node)
        if not signs_attr.users:
            gm.graph.erase_node(signs_attr)
            if not any(n.op == "get_attr" and n.target == signs_attr.target for n in gm.graph.nodes):
                _delete_attr(gm, str(signs_attr.target))
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _module_name(op: OpRef) -> str:
    return "qlinear_" + re.sub(r"\W", "_", op.name)


def lower_fx(view: FxGraphView, plan: QuantPlan) -> None:
    """Lower every quantized linear of the plan to a QuantLinear submodule, then fuse the online
    rotations that feed per-token quantization into it.
    """
    for edit in plan.edits:
        lower_linear_fx(view, edit.op, edit.qlinear)
    view.invalidate()
    fuse_rotations_into_quantize(view.gm)


def lower_linear_fx(view: FxGraphView, op: OpRef, q: QLinear) -> None:
    """Replace one aten.linear / matmul node by a call to a QuantLinear submodule."""
    gm: fx.GraphModule = view.gm
    node = view.node(op)
    x = node.args[0]
    bias = view.read(q.weight.bias) if q.weight.bias is not None else None
    form = linear_form(q, op.name)
    weight_fp = (
        canonical_weight(view.read(q.weight.const), q.weight) if form is LinearForm.FLOAT_WEIGHT else None
    )
    if q.is_conv:  # the same Q/DQ arithmetic as the ONNX form (lowering/torch_conv.py)
        weight_fp = view.read(q.weight.const) if form is LinearForm.FLOAT_WEIGHT else None
        module = QuantConv(q, weight_fp, bias, *conv_arguments(op.op_type, node.args, node.kwargs))
    else:
        module = quant_module(q, weight_fp, bias, op.name)
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


def quant_module(
    q: QLinear, weight_fp: torch.Tensor | None, bias: torch.Tensor | None, name: str = ""
) -> QuantLinear:
    """The module computing `q` (`weight_fp`: the float weight [out, in], needed only when `q`
    keeps it float): QuantLinear, or its corrected / decomposed variants, by `linear_form`.
    """
    form = linear_form(q, name)
    if form is LinearForm.CORRECTED:  # LoRC / kept weights: extra float terms beside the quantized path
        return CorrectedQuantLinear(q, weight_fp, bias)
    if form is LinearForm.DECOMPOSED:  # LLM.int8 decomposition: an INT8 part and a float part
        return DecomposedQuantLinear(q, weight_fp, bias)
    return QuantLinear(q, weight_fp, bias)


@dataclass(frozen=True)
class Rotation:
    """An online rotation of a linear's input: x @ diag(signs) H (a Hadamard) or x @ matrix."""

    signs: torch.Tensor | None = None
    matrix: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            return torch.ops.qpass.hadamard_transform(x, self.signs.to(x.dtype))
        return x @ self.matrix.to(x.dtype)


class PreRotated(torch.nn.Module):
    """An online rotation in front of the module that consumes it.

    Where a recipe's online rotation is mapped back onto a user's module tree (a transformers
    model quantized in place), the rotation belongs to the linear it feeds; per-token W8A8
    linears take a Hadamard into their quantizer instead (`QuantLinear.rotation_signs`, one
    fused kernel).
    """

    def __init__(self, rotation: Rotation, inner: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("signs", None if rotation.signs is None else rotation.signs.float().clone())
        self.register_buffer("matrix", None if rotation.matrix is None else rotation.matrix.float().clone())
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(Rotation(self.signs, self.matrix)(x))


class PostRotated(torch.nn.Module):
    """A module whose output is rotated online (a tied embedding's output in the QuaRot layout:
    its weight also serves the output head, so the rotation cannot be folded into it).
    """

    def __init__(self, inner: torch.nn.Module, rotation: Rotation) -> None:
        super().__init__()
        self.register_buffer("signs", None if rotation.signs is None else rotation.signs.float().clone())
        self.register_buffer("matrix", None if rotation.matrix is None else rotation.matrix.float().clone())
        self.inner = inner

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return Rotation(self.signs, self.matrix)(self.inner(*args, **kwargs))


def with_rotation(rotation: Rotation, module: torch.nn.Module) -> torch.nn.Module:
    """`module` reading its input rotated: a Hadamard fused into a per-token W8A8 quantizer where
    the kernel takes it (power-of-two sizes), else a `PreRotated` wrapper.
    """
    signs = rotation.signs
    n = 0 if signs is None else signs.numel()
    fusable = isinstance(module, QuantLinear) and module.kernel is LinearKernel.W8A8_DYNAMIC
    if fusable and n and not n & (n - 1) and module.rotation_signs is None:
        module.rotation_signs = signs.detach().to(torch.float32).clone()
        return module
    return PreRotated(rotation, module)
