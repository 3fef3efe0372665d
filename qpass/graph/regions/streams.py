"""The residual stream found from graph structure: values joined by residual sums and casts.

A residual sum is an Add of two different activations of one static width, or a norm that adds
its inputs before normalising (ONNX Runtime's Skip*LayerNormalization, whose output 3 is the sum:
`GraphView.residual_sum`). Union-find over those sums and the width-preserving casts between
them gives the stream components; a component counts only when a linear or a norm reads it
(this leaves out e.g. RoPE's q*cos + r(q)*sin). Shared by the QuaRot layout (`residual`) and the
block cutter (`blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef
from qpass.graph.regions.sites import NORMS, last_dim
from qpass.graph.view import GraphView

SQUARE_OPS = ("pow", "Pow")


@dataclass
class Component:
    width: int
    values: set[str]
    adds: set[str]  # residual sum ops inside the component (Adds and fused norms)
    casts: set[str]  # casts between two stream values
    fused: dict[str, OpRef] = field(default_factory=dict)  # the norms among `adds`: they also read it


def only_one_act(view: GraphView, op: OpRef) -> bool:
    return len(view.value_operands(op)) == 1


def _residual_add(view: GraphView, op: OpRef) -> int | None:
    """Width of a residual Add (two different activations, same static last dim), else None."""
    if op.kind is not OpKind.ADD or any(isinstance(i, ConstRef) for i in view.op_inputs(op)):
        return None
    return _same_width(view, [*view.value_operands(op), view.op_output(op)], 2)


def _same_width(view: GraphView, values: list[ValueRef], summands: int) -> int | None:
    """The one static last dim of `summands` different inputs and their sum (rank > 1), else None."""
    if len(values) != summands + 1 or len(set(values[:summands])) != summands:
        return None
    dims = {last_dim(view, v) for v in values}
    ranks = {len(view.shape(v) or ()) for v in values}
    if len(dims) != 1 or None in dims or len(ranks) != 1 or ranks == {1}:
        return None
    return dims.pop()


def _fused_sum(view: GraphView, op: OpRef) -> tuple[int, list[ValueRef]] | None:
    """(width, joined values) of a norm that adds its inputs, else None."""
    found = view.residual_sum(op) if op.kind in NORMS else None
    if found is None:
        return None
    ins = list(found.inputs)
    width = _same_width(view, [*ins, found.total or view.op_output(op)], len(ins))
    return None if width is None else (width, ins + ([found.total] if found.total else []))


def components(view: GraphView) -> list[Component]:
    """Values joined by residual sums and by casts (union-find), each with a linear or norm reader."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    sums: dict[str, tuple[int, str, OpRef]] = {}  # op -> (width, a joined value, op)
    casts: set[str] = set()
    for op in view.ops(frozenset({OpKind.ADD, OpKind.CAST, *NORMS})):
        out = view.op_output(op)
        if op.kind is OpKind.CAST:
            if not only_one_act(view, op):
                continue
            (src,) = view.value_operands(op)
            if last_dim(view, src) is None or last_dim(view, src) != last_dim(view, out):
                continue
            casts.add(op.name)
            joined = [src, out]
        elif op.kind is OpKind.ADD:
            width = _residual_add(view, op)
            if width is None:
                continue
            joined = [*view.value_operands(op), out]
            sums[op.name] = (width, out.name, op)
        else:
            fused = _fused_sum(view, op)
            if fused is None:
                continue
            width, joined = fused
            sums[op.name] = (width, joined[0].name, op)
        for v in joined[:-1]:
            parent[find(v.name)] = find(joined[-1].name)
    members: dict[str, set[str]] = {}
    for name in list(parent):
        members.setdefault(find(name), set()).add(name)
    groups: dict[str, Component] = {}
    for name, (width, value, op) in sums.items():
        root = find(value)
        comp = groups.setdefault(root, Component(width, members[root], set(), set()))
        comp.adds.add(name)
        if op.kind in NORMS:
            comp.fused[name] = op
    for op in view.ops(frozenset({OpKind.CAST})):
        comp = groups.get(find(view.op_output(op).name))
        if comp is not None and op.name in casts:
            comp.casts.add(op.name)
    return [c for c in groups.values() if c.fused or _has_stream_reader(view, c)]


def residual_adds(view: GraphView) -> set[str]:
    """The residual sums of every stream component: where each block writes its result back."""
    return {name for comp in components(view) for name in comp.adds}


def _has_stream_reader(view: GraphView, comp: Component) -> bool:
    kinds = (OpKind.LINEAR, OpKind.LAYER_NORM, OpKind.RMS_NORM)
    return any(
        c.kind in kinds or c.op_type in SQUARE_OPS for v in comp.values for c in view.consumers(ValueRef(v))
    )
