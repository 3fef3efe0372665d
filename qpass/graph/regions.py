"""Smoothing sites found from graph structure: an activation, the linears reading it, and the
constants upstream that can absorb a per-channel factor exactly.

Shared by every pass that migrates a per-channel factor across an activation (smoothing,
shifting, and later rotation/reordering). No per-architecture name tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.view import GraphView, iter_linear_ops


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
class Absorber:
    """Constants that, divided by s along `axis`, divide the site's activation channels by s.

    `period` is set when the factor reaches the site through attention (probs @ V, heads split
    and merged): then s must repeat with the head size, s[c] = s[c % period], and each target
    takes it tiled to its own width (GQA: V has fewer heads than the site has channels).
    """

    targets: tuple[tuple[ConstRef, int], ...]
    path: str  # human-readable description, for reports
    period: int | None = None
    rotatable: bool = False  # only linear maps on the way (no norm gamma, no elementwise product)


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


def absorbable_sites(view: GraphView) -> tuple[list[tuple[Site, Absorber]], list[tuple[str, str]]]:
    """Sites whose activation an upstream absorber can take a per-channel factor for, with (site,
    reason) for the rest: what every scale/shift migration (smoothing, AWQ, OS+) starts from.
    """
    sites, rejected = find_sites(view)
    usable = []
    for site in sites:
        absorber = find_absorber(view, site.value, site.channels)
        if isinstance(absorber, str):
            rejected.append((site.label, absorber))
        else:
            usable.append((site, absorber))
    return usable, rejected


_PASS_THROUGH = (OpKind.CAST,)


def find_absorber(view: GraphView, value: ValueRef, channels: int) -> Absorber | str:
    """Constants upstream of `value` that can absorb a per-channel division, or the reason none can."""
    targets: list[tuple[ConstRef, int]] = []
    path: list[str] = []
    current = value
    linear_only = True  # a norm gamma or a product scales channels but cannot carry a rotation
    while True:
        op = view.producer(current)
        if op is None:
            return f"'{current.name}' is a graph input"
        path.append(f"{op.op_type} '{op.name}'")
        if op.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
            params = view.norm_params(op)
            if params is None or params.gamma is None:
                return f"{op.op_type} '{op.name}' has no per-channel scale (gamma)"
            targets += [(params.gamma, 0)] + ([(params.beta, 0)] if params.beta is not None else [])
            linear_only = False
            break
        if op.kind is OpKind.LINEAR:
            weight = view.weight(op)
            if weight is None or weight.out_features != channels:
                return f"{op.op_type} '{op.name}' output width does not match {channels} channels"
            targets.append((weight.const, weight.out_axis))
            if weight.bias is not None and all(
                weight.bias != c for c, _ in targets
            ):  # ONNX: its Add seen first
                targets.append((weight.bias, 0))
            break
        if op.kind in (OpKind.MUL, OpKind.ADD):
            const_act = view.constant_operand(op)
            if const_act is not None:
                const, act = const_act
                if not is_channel_vector(const, channels):
                    return f"{op.op_type} '{op.name}' constant {const.shape} is not per-channel"
                targets.append((const, len(const.shape) - 1))
                if op.kind is OpKind.MUL:
                    linear_only = False
                    break
                current = act  # bias add: the rest of the path must take the factor too
            else:
                acts = view.value_operands(op)
                if op.kind is OpKind.ADD or len(acts) != 2:
                    return f"{op.op_type} '{op.name}' adds two activations (residual without a norm)"
                # x * y: scaling one factor scales the product; take the first branch that can absorb
                reasons = []
                for branch in acts:
                    if len(view.consumers(branch)) != 1:
                        reasons.append(f"'{branch.name}' has other consumers")
                        continue
                    sub = find_absorber(view, branch, channels)
                    if isinstance(sub, Absorber):
                        targets += sub.targets
                        path.append(sub.path)
                        return _checked(view, Absorber(tuple(targets), " <- ".join(path), sub.period))
                    reasons.append(sub)
                return f"{op.op_type} '{op.name}': no branch can absorb ({'; '.join(reasons)})"
        elif op.kind in _PASS_THROUGH:
            acts = view.value_operands(op)
            if len(acts) != 1:
                return f"{op.op_type} '{op.name}' is not a plain cast"
            current = acts[0]
        elif op.kind in _HEAD_LAYOUT:
            found = _through_attention(view, current, channels)
            if isinstance(found, Absorber) and targets:  # bias adds before the attention path
                found = Absorber(
                    (*targets, *found.targets),
                    " <- ".join([*path, found.path]),
                    found.period,
                    found.rotatable and linear_only,
                )
            return _checked(view, found)
        else:
            return f"producer {op.op_type} '{op.name}' is not per-channel affine"
        if len(view.consumers(current)) != 1 or view.is_graph_output(current):
            return f"intermediate '{current.name}' feeds other ops"
    return _checked(view, Absorber(tuple(targets), " <- ".join(path), rotatable=linear_only))


_HEAD_LAYOUT = (OpKind.RESHAPE, OpKind.TRANSPOSE, OpKind.EXPAND)
_LAYOUT = (*_HEAD_LAYOUT, OpKind.CAST)


def _last_dim(view: GraphView, value: ValueRef) -> int | None:
    shape = view.shape(value)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _through_attention(view: GraphView, value: ValueRef, channels: int) -> Absorber | str:
    """Site <- merge heads <- (probs @ V | attention(q, k, V)) <- split heads <- V projection.

    Exact when every value on the way keeps the head dimension last and the factor (or a
    per-head rotation) only
    depends on the position inside a head (period = head size): head reshuffles (transpose,
    GQA repeat) then cannot mix different factors.
    """
    current, path, mixed, widths = value, [], None, []
    while True:
        op = view.producer(current)
        if op is None:
            return f"'{current.name}' is a graph input"
        path.append(f"{op.op_type} '{op.name}'")
        operands = view.value_operands(op)
        if op.kind in _LAYOUT and operands:
            current = operands[0]
        elif op.kind is OpKind.ATTENTION and mixed is None and len(operands) >= 3:
            mixed, current = op, operands[2]
        elif op.kind is OpKind.MATMUL and mixed is None and len(operands) == 2:
            mixed, current = op, operands[1]
        elif mixed is not None and op.kind in (OpKind.LINEAR, OpKind.ADD):
            break
        else:
            return f"producer {op.op_type} '{op.name}' is not per-channel affine"
        if len(view.consumers(current)) != 1 or view.is_graph_output(current):
            return f"intermediate '{current.name}' feeds other ops"
        width = _last_dim(view, current)
        if width is None:
            return f"'{current.name}' has no static channel width"
        widths.append(width)
        if mixed is not None and op is mixed:
            head = width
    if mixed is None:
        return "no attention on the path"
    v_width = _last_dim(view, current)
    if (
        v_width is None
        or v_width % head
        or channels % head
        or any(w not in (head, channels, v_width) for w in widths)
    ):
        return f"heads of size {head} are not kept last between '{current.name}' and '{value.name}'"
    inner = find_absorber(view, current, v_width)
    if isinstance(inner, str):
        return inner
    return Absorber(inner.targets, " <- ".join([*path, inner.path]), period=head, rotatable=inner.rotatable)


def is_channel_vector(const: ConstRef, channels: int) -> bool:
    if not const.shape or const.shape[-1] != channels:
        return False
    size = 1
    for d in const.shape:
        size *= d
    return size == channels


def _checked(view: GraphView, absorber: Absorber | str) -> Absorber | str:
    if isinstance(absorber, str):
        return absorber
    for const, _ in absorber.targets:
        users = view.const_users(const)
        if users != 1:
            return f"constant '{const.name}' is shared by {users} ops"
    return absorber
