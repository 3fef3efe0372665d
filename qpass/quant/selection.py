"""Which linears a recipe quantizes: `exclude:` and `only:` selectors, by name glob or by
structural role, the same on torch.fx and ONNX graphs (what llm-compressor's `ignore=` and the
GenAI builder's `nodes_to_exclude` do).

A selector is a glob matched against the op's name and its scope (the module path on torch.fx,
the node name on ONNX), or a role found from graph structure:
- `output_head`: a linear whose output reaches a graph output through no other linear (an LM's
  lm_head, a classifier's last layer).
- `first_block` / `last_block`: the linears of the first / last layer of the residual stack. The
  stream's sublayer blocks (`qpass.graph.regions.blocks`) are grouped into layers, a new layer
  starting at each sublayer that holds attention (a softmax, a fused attention or an
  activation-by-activation matmul): attention + MLP is one layer, a parallel block is one layer
  too. Without attention every sublayer is a layer; the tail (final norm, head) is in none.
  These are the layers quantization studies keep at higher precision (the first layers carry
  the attention sinks and massive activations).
A linear left float is reported with the selector that left it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from qpass.errors import ConfigError
from qpass.graph.refs import OpKind, OpRef
from qpass.graph.regions.blocks import find_blocks
from qpass.graph.view import GraphView

ROLES = ("output_head", "first_block", "last_block")
_ATTENTION = frozenset({OpKind.SOFTMAX, OpKind.ATTENTION, OpKind.MATMUL})


@dataclass(frozen=True)
class LayerSelection:
    """`exclude:` wins over `only:`; an empty `only` selects every linear."""

    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()

    @classmethod
    def parse(cls, exclude: object, only: object, origin: str) -> LayerSelection:
        def strings(value: object, key: str) -> tuple[str, ...]:
            if value is None:
                return ()
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                msg = f"{origin}: recipe key '{key}': expected a list of name globs or roles {ROLES}"
                raise ConfigError(msg)
            return tuple(value)

        return cls(strings(exclude, "exclude"), strings(only, "only"))

    def __bool__(self) -> bool:
        return bool(self.exclude or self.only)


class Selector:
    """`LayerSelection` bound to one graph: the roles are found once."""

    def __init__(self, view: GraphView, selection: LayerSelection) -> None:
        self.view, self.selection = view, selection
        roles = {s for s in (*selection.exclude, *selection.only) if s in ROLES}
        self._by_role = {
            "output_head": _output_heads(view) if "output_head" in roles else set(),
            **(_end_layers(view) if roles & {"first_block", "last_block"} else {}),
        }

    def _matches(self, op: OpRef, selector: str) -> bool:
        if selector in ROLES:
            return op.name in self._by_role.get(selector, set())
        return any(fnmatch.fnmatchcase(name, selector) for name in (op.name, self.view.scope(op)))

    def skip_reason(self, op: OpRef) -> str | None:
        """Why `op` stays float under the selection, or None (it is quantized)."""
        for s in self.selection.exclude:
            if self._matches(op, s):
                return f"excluded by recipe key 'exclude': {s!r}"
        if self.selection.only and not any(self._matches(op, s) for s in self.selection.only):
            return f"not selected by recipe key 'only': {list(self.selection.only)}"
        return None


def _output_heads(view: GraphView) -> set[str]:
    """Linears from whose output a graph output is reached without passing another linear."""
    heads = set()
    for op in view.ops(frozenset({OpKind.LINEAR})):
        todo, seen = [view.op_output(op)], set()
        while todo:
            value = todo.pop()
            if value.name in seen:
                continue
            seen.add(value.name)
            if view.is_graph_output(value):
                heads.add(op.name)
                break
            for consumer in view.consumers(value):
                if consumer.kind is not OpKind.LINEAR:
                    todo.append(view.op_output(consumer))
    return heads


def _end_layers(view: GraphView) -> dict[str, set[str]]:
    """The quantizable ops of the first and of the last layer (see the module doc)."""
    blocks = [b for b in find_blocks(view) if b.end is not None]  # the tail is in no layer
    attends = [any(op.kind in _ATTENTION for op in b.ops) for b in blocks]
    layers: list[set[str]] = []
    for block, starts in zip(blocks, attends, strict=True):
        names = {op.name for op in block.quantizable}
        if not layers or starts or not any(attends):
            layers.append(names)
        else:
            layers[-1] |= names
    return {"first_block": layers[0] if layers else set(), "last_block": layers[-1] if layers else set()}
