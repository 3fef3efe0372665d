"""Scale sites found from graph structure: an activation and the linears reading it, plus the
small structural predicates every region walk shares (channel width, per-channel constants,
shared constants, the producer past casts, values escaping a region).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.view import GraphView, iter_linear_ops

HEAD_LAYOUT = (OpKind.RESHAPE, OpKind.TRANSPOSE, OpKind.EXPAND)
LAYOUT = (*HEAD_LAYOUT, OpKind.CAST)
NORMS = (OpKind.LAYER_NORM, OpKind.RMS_NORM)


@dataclass(frozen=True)
class Sink:
    """A linear reading the site's activation; its weight's input channels take the factor."""

    op: OpRef
    weight: WeightRef


@dataclass(frozen=True)
class Site:
    """An activation whose every consumer is a linear with a constant weight."""

    value: ValueRef
    channels: int
    sinks: tuple[Sink, ...]

    @property
    def label(self) -> str:
        return f"{self.value.name} -> {', '.join(s.op.name for s in self.sinks)}"


@dataclass(frozen=True)
class OnSite:
    """A site and what a walk found for it (subclasses add that): named and calibrated as the site."""

    site: Site

    @property
    def label(self) -> str:
        return self.site.label

    @property
    def value(self) -> ValueRef:
        return self.site.value


def find_sites(view: GraphView) -> tuple[list[Site], list[tuple[str, str]]]:
    """Group linears by input activation. Returns the sites and (site, reason) for rejected ones."""
    by_value: dict[str, list[OpRef]] = {}
    for op in iter_linear_ops(view):
        if op.kind is OpKind.LINEAR:
            by_value.setdefault(view.linear_input(op).name, []).append(op)
    sites, rejected = [], []
    for name, ops in by_value.items():
        value = ValueRef(name)
        others = [c for c in view.consumers(value) if c.name not in {o.name for o in ops}]
        label = f"{name} -> {', '.join(o.name for o in ops)}"
        others = [c for c in others if c.kind is not OpKind.SHAPE_OF]  # reads the shape only
        if others:
            rejected.append(
                (label, f"activation also feeds {others[0].op_type} '{others[0].name}' (not a linear)")
            )
            continue
        sinks = tuple(Sink(op, w) for op in ops if (w := view.weight(op)) is not None)
        tied = [s for s in sinks if view.const_users(s.weight.const) != 1]
        if tied:
            users = view.const_users(tied[0].weight.const)
            rejected.append((label, f"weight '{tied[0].weight.const.name}' is shared by {users} ops (tied)"))
            continue
        widths = {s.weight.in_features for s in sinks}
        if len(widths) != 1:
            rejected.append((label, f"linears disagree on input width {sorted(widths)}"))
            continue
        sites.append(Site(value, widths.pop(), sinks))
    return sites, rejected


def last_dim(view: GraphView, value: ValueRef) -> int | None:
    """The static channel width (last dimension) of `value`, or None."""
    shape = view.shape(value)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def const_size(const: ConstRef) -> int:
    return math.prod(const.shape) if const.shape else 1


def is_channel_vector(const: ConstRef, channels: int) -> bool:
    """A constant holding exactly one value per channel (any leading unit dimensions)."""
    return bool(const.shape) and const.shape[-1] == channels and const_size(const) == channels


def shared_constant(view: GraphView, consts: Iterable[ConstRef]) -> str | None:
    """Why the first constant read by more than one op cannot be rewritten, or None."""
    for const in consts:
        users = view.const_users(const)
        if users != 1:
            return f"constant '{const.name}' is shared by {users} ops"
    return None


def producer_past_casts(view: GraphView, value: ValueRef) -> OpRef | None:
    """The op producing `value`, looking through casts (None for a graph input)."""
    op = view.producer(value)
    while op is not None and op.kind is OpKind.CAST:
        operands = view.value_operands(op)
        if not operands:
            return op
        op = view.producer(operands[0])  # the data; a second operand (type_as(x, ref)) only names the dtype
    return op


def linear_rows(view: GraphView, op: OpRef, channels: int) -> list[tuple[ConstRef, int]] | str:
    """A producer linear's output rows (and bias) emitting `channels`, or why they do not match."""
    weight = view.weight(op)
    if weight is None or weight.out_features != channels:
        return f"{op.op_type} '{op.name}' output width does not match {channels} channels"
    return [(weight.const, weight.out_axis)] + ([(weight.bias, 0)] if weight.bias is not None else [])


def region_step(
    view: GraphView, value: ValueRef, channels: int, norm_why: str
) -> tuple[OpRef, list[tuple[ConstRef, int]] | None] | str:
    """One step up a channel region: the producer of `value`, with its output rows when it is a
    linear. A graph input ends the region, and so does a norm (`norm_why` says why it cannot
    take part: its channels are the residual stream's, or its statistics would change).
    """
    op = view.producer(value)
    if op is None:
        return f"'{value.name}' is a graph input"
    if op.kind in NORMS:
        return f"{op.op_type} '{op.name}' output: {norm_why}"
    if op.kind is OpKind.LINEAR:
        rows = linear_rows(view, op, channels)
        return rows if isinstance(rows, str) else (op, rows)
    return op, None


def escape_reason(view: GraphView, value: ValueRef, region_ops: set[str]) -> str | None:
    """Why an intermediate value of a rewritten region is visible outside it, or None."""
    if view.is_graph_output(value):
        return f"intermediate '{value.name}' is a graph output"
    outside = [c for c in view.consumers(value) if c.name not in region_ops and c.kind is not OpKind.SHAPE_OF]
    if outside:
        return f"intermediate '{value.name}' also feeds {outside[0].op_type} '{outside[0].name}'"
    return None
