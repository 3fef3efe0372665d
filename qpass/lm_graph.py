"""What the causal-LM route reads from the captured graph: the constants' and compute nodes' names
before the passes ran, constants by their dotted names, linear nodes, and the module each node was
traced in (`nn_module_stack`). The graph's constants are named "lm.<parameter name>" by the capture
wrapper, so a name in the graph is a name in the user's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

PREFIX = "lm."  # the capture wrapper's attribute: graph constants are named "lm.<parameter name>"


@dataclass(frozen=True)
class Signature:
    calls: frozenset[str]  # names of the captured graph's compute nodes
    constants: dict[str, tuple[int, ...]]  # get_attr targets and their shapes


def graph_signature(gm: fx.GraphModule) -> Signature:
    calls = frozenset(
        n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
    )
    constants = {
        str(n.target): tuple(attr(gm, str(n.target)).shape) for n in gm.graph.nodes if n.op == "get_attr"
    }
    return Signature(calls, constants)


def attr(root: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.linear.default


def module_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(PREFIX) :] if path.startswith(PREFIX) else None
