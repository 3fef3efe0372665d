"""Online rotations a recipe inserted into the captured graph, placed in the module tree: each
belongs to the module whose output it rotates (a tied embedding) or whose input it rotates (the
Hadamard before down_proj, the final norm of a tied model), found from `nn_module_stack`, never from
module names. Anything else a pass inserted has no module to live in, and the recipe is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qpass.errors import ConfigError
from qpass.lm_graph import Signature, attr, module_of
from qpass.registry import PostRotated, PreRotated, Rotation


@dataclass(frozen=True)
class Placement:
    """An online rotation the passes inserted, and the module it becomes part of."""

    module: str  # path in the user's model
    before: bool  # True: rotates the module's input; False: its output
    rotation: Rotation


def online_rotations(gm: fx.GraphModule, before: Signature, recipe: str) -> list[Placement]:
    """Where each inserted online rotation lives in the module tree; any other new op refuses.

    A rotation whose readers all sit in one module rotates that module's input; one whose source
    is the last op of a module (its readers all outside it) rotates that module's output. The
    module is read from the nodes' `nn_module_stack`, so nothing here names an architecture.
    """
    hadamard = torch.ops.qpass.hadamard_transform.default
    found: list[Placement] = []
    last = _last_nodes(gm)
    now = {n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
    gone = sorted(before.calls - now)
    if gone:
        msg = f"recipe '{recipe}': its passes removed op '{gone[0]}' from the graph; no module of the model can drop it"
        raise ConfigError(msg)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.name in before.calls:
            continue
        const = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], fx.Node) else None
        place = None
        if (
            node.target in (hadamard, torch.ops.aten.matmul.default)
            and const is not None
            and const.op == "get_attr"
        ):
            value = attr(gm, str(const.target)).detach().clone()
            rotation = Rotation(signs=value) if node.target is hadamard else Rotation(matrix=value)
            place = _host(node, rotation, last)
        if place is None:
            msg = (
                f"recipe '{recipe}': pass-inserted op '{node.name}' ({node.target}) has no module to live in "
                "(only online rotations at a module's input or output map back onto a transformers model)"
            )
            raise ConfigError(msg)
        found.append(place)
    return found


def _inside(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(module + "."))


def _last_nodes(gm: fx.GraphModule) -> dict[str, str]:
    """Each module path -> the name of its last node in graph order (what the module returns)."""
    last: dict[str, str] = {}
    for n in gm.graph.nodes:
        path = module_of(n)
        while path:
            last[path] = n.name
            path = path.rpartition(".")[0]
    return last


def _host(node: fx.Node, rotation: Rotation, last: dict[str, str]) -> Placement | None:
    """The module an inserted rotation belongs to: the producer whose output it rotates (the
    rotation's source is that module's last node, all readers outside it), else the one module
    whose input it rotates (every reader inside it, nothing derived from it leaving the module
    except through the module's last node). None: no module holds it exactly.
    """
    src = node.args[0]
    producer = module_of(src) if isinstance(src, fx.Node) else None
    if (
        producer
        and last.get(producer) == src.name
        and not any(_inside(module_of(u), producer) for u in node.users)
    ):
        return Placement(producer, False, rotation)
    readers = {module_of(u) for u in node.users}
    if len(readers) != 1 or None in readers:
        return None
    (module,) = readers
    seen, todo = set(), list(node.users)
    while todo:
        u = todo.pop()
        if u.name in seen:
            continue
        seen.add(u.name)
        for v in u.users:
            if _inside(module_of(v), module):
                todo.append(v)
            elif last.get(module) != u.name:
                return None  # a value computed from the rotated input escapes the module
    return Placement(module, True, rotation)


def place_rotations(target: nn.Module, placements: list[Placement]) -> None:
    """Wrap each host module with its rotation (float modules; linears are swapped later)."""
    for place in placements:
        parent_path, _, child = place.module.rpartition(".")
        parent = target.get_submodule(parent_path) if parent_path else target
        module = getattr(parent, child)
        wrapped = PreRotated(place.rotation, module) if place.before else PostRotated(module, place.rotation)
        setattr(parent, child, wrapped)
