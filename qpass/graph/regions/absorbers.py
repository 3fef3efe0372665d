"""Absorbers: the constants upstream of a site's activation that can take a per-channel factor
exactly (a norm's gamma and beta, a producer linear's output rows and bias, one branch of an
elementwise product, V's projection through attention), and the producer's additive constant
or norm parameters found the same way.

Shared by every pass that migrates a per-channel factor across an activation (smoothing,
AWQ, shifting, rotation, reordering, norm fusion). No per-architecture name tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef
from qpass.graph.regions.sites import (
    HEAD_LAYOUT,
    LAYOUT,
    NORMS,
    OnSite,
    Site,
    find_sites,
    is_channel_vector,
    last_dim,
    linear_rows,
    producer_past_casts,
    shared_constant,
)
from qpass.graph.view import GraphView


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


@dataclass(frozen=True)
class Migration(OnSite):
    """A site and the absorber that takes the inverse of whatever factor its sinks take."""

    absorber: Absorber


def absorbable_sites(view: GraphView) -> tuple[list[Migration], list[tuple[str, str]]]:
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
            usable.append(Migration(site, absorber))
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
        if op.kind in NORMS:
            params = view.norm_params(op)
            if params is None or params.gamma is None:
                return f"{op.op_type} '{op.name}' has no per-channel scale (gamma)"
            targets += [(params.gamma, 0)] + ([(params.beta, 0)] if params.beta is not None else [])
            linear_only = False
            break
        if op.kind is OpKind.LINEAR:
            rows = linear_rows(view, op, channels)
            if isinstance(rows, str):
                return rows
            targets += [
                r for r in rows if all(r[0] != c for c, _ in targets)
            ]  # ONNX: its bias Add seen first
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
                    if _readers(view, branch) != 1:
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
        elif op.kind in (*HEAD_LAYOUT, OpKind.ATTENTION):
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
        if _readers(view, current) != 1 or view.is_graph_output(current):
            return f"intermediate '{current.name}' feeds other ops"
    return _checked(view, Absorber(tuple(targets), " <- ".join(path), rotatable=linear_only))


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
        if op.kind in LAYOUT and operands:
            current = operands[0]
        elif op.kind is OpKind.ATTENTION and mixed is None:
            v_in = view.attention_operands(op)[2]
            if v_in is None:
                return f"{op.op_type} '{op.name}' reads V packed with q and k in one input"
            if view.writes_cache(op):
                return f"{op.op_type} '{op.name}' writes V into its cache (present), which a factor would change"
            if len(view.shape(v_in) or ()) < 4:
                return f"{op.op_type} '{op.name}' reads V with its heads merged in the channels"
            mixed, current = op, v_in
        elif op.kind is OpKind.MATMUL and mixed is None and len(operands) == 2:
            mixed, current = op, operands[1]
        elif mixed is not None and op.kind in (OpKind.LINEAR, OpKind.ADD):
            break
        else:
            return f"producer {op.op_type} '{op.name}' is not per-channel affine"
        if _readers(view, current) != 1 or view.is_graph_output(current):
            return f"intermediate '{current.name}' feeds other ops"
        width = last_dim(view, current)
        if width is None:
            return f"'{current.name}' has no static channel width"
        widths.append(width)
        if mixed is not None and op is mixed:
            head = width
    if mixed is None:
        return "no attention on the path"
    v_width = last_dim(view, current)
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


def _readers(view: GraphView, value: ValueRef) -> int:
    """Ops that read `value`'s entries: a Shape/Size reader (the legacy exporter's `x.size()`) only
    sees the shape, which a per-channel factor, permutation or rotation leaves as it is.
    """
    return sum(1 for c in view.consumers(value) if c.kind is not OpKind.SHAPE_OF)


def _checked(view: GraphView, absorber: Absorber | str) -> Absorber | str:
    if isinstance(absorber, str):
        return absorber
    return shared_constant(view, (c for c, _ in absorber.targets)) or absorber


# ------------------------------------------------------------------------------ at the producer
@dataclass(frozen=True)
class ShiftTarget:
    """Where a shift -z/s lands: an existing additive constant, or the bias of a producer linear."""

    const: ConstRef | None = None
    linear: OpRef | None = None


def _producer(view: GraphView, site: Site, param: str, lacks: str) -> tuple[OpRef, ConstRef | None] | str:
    """The producer of the site's activation past casts and, if it is a norm, its `param`
    (gamma | beta), or why there is none.
    """
    op = producer_past_casts(view, site.value)
    if op is None:
        return "activation is a graph input"
    if op.kind not in NORMS:
        return op, None
    params = view.norm_params(op)
    const = getattr(params, param) if params is not None else None
    return (op, const) if const is not None else f"{op.op_type} '{op.name}' has no {lacks}"


def find_shift_target(view: GraphView, site: Site, absorber: Absorber) -> ShiftTarget | str:
    """The additive constant right at the producer of the site's activation, or why there is none."""
    if absorber.period is not None:
        return "through attention only a scale is exact (a shift would need V's bias per head)"
    found = _producer(view, site, "beta", "beta to absorb the shift")
    if isinstance(found, str):
        return found
    op, beta = found
    if beta is not None:
        return ShiftTarget(const=beta)
    if op.kind is OpKind.LINEAR and view.weight(op) is not None:
        return ShiftTarget(linear=op)
    if op.kind is OpKind.ADD:
        const_act = view.constant_operand(op)
        if const_act is not None and is_channel_vector(const_act[0], site.channels):
            return ShiftTarget(const=const_act[0])
    return f"producer {op.op_type} '{op.name}' has no additive constant to absorb the shift"


def norm_constants(view: GraphView, site: Site) -> tuple[ConstRef, ConstRef | None] | str:
    """(gamma, beta) of the per-channel affine producer of the site's activation, or why not."""
    found = _producer(view, site, "gamma", "per-channel gamma")
    if isinstance(found, str):
        return found
    op, gamma = found
    if gamma is not None:
        return gamma, view.norm_params(op).beta
    const_act = view.constant_operand(op) if op.kind is OpKind.MUL else None
    if const_act is None or not is_channel_vector(const_act[0], site.channels):
        return f"producer {op.op_type} '{op.name}' is not a norm or a per-channel scale"
    return const_act[0], None
