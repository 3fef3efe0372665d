"""Which linears a recipe quantizes: `exclude:` and `only:` selectors, by name glob or by
structural role, the same on torch.fx and ONNX graphs (what llm-compressor's `ignore=` and the
GenAI builder's `nodes_to_exclude` do).

A selector is a glob matched against the op's name and its scope (the module path on torch.fx,
the node name on ONNX), or a role found from graph structure:
- `output_head`: a linear whose output reaches a graph output through no other linear (an LM's
  lm_head, a classifier's last layer).
A linear left float is reported with the selector that left it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from qpass.errors import ConfigError
from qpass.graph.refs import OpKind, OpRef
from qpass.graph.view import GraphView

ROLES = ("output_head",)


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
        self._heads = _output_heads(view) if "output_head" in roles else set()

    def _matches(self, op: OpRef, selector: str) -> bool:
        if selector == "output_head":
            return op.name in self._heads
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
