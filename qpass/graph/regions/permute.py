"""Channel-permutation regions: values whose channels can be stored permuted with the
permutation folded into constants on both sides (no new op). Used by `reorder`.

- linear inputs: the consumers' input columns, and the producer side found through only linear
  maps (an absorber) or back through elementwise ops to linears (every branch permuted);
- the K cache: Q K^T whose Q and K come straight from projections through head-layout ops
  only, the head dimension of W_q and W_k permuted together.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.regions.absorbers import Absorber, find_absorber
from qpass.graph.regions.sites import (
    LAYOUT,
    Site,
    const_size,
    escape_reason,
    is_channel_vector,
    last_dim,
    region_step,
    shared_constant,
)
from qpass.graph.view import GraphView


@dataclass(frozen=True)
class PermutableSite:
    """A value whose channels can be stored permuted: the constants to permute on each side."""

    label: str
    value: ValueRef  # the activation whose statistics order the channels
    width: int  # channels of `value`
    period: int  # the permutation repeats with this period (width when it does not)
    sinks: tuple[tuple[ConstRef, int], ...]  # consumer side: (constant, axis)
    sources: tuple[tuple[ConstRef, int], ...]  # producer side: (constant, axis)
    key_weights: tuple[WeightRef, ...] = ()  # whose magnitudes order the channels (key: weight)
    what: str = "linear input"


_NORM_WHY = "its channels are the residual stream's (every reader and writer would need the permutation)"
_ELEMENTWISE_BINARY = (OpKind.MUL, OpKind.ADD, OpKind.SUB, OpKind.DIV)


def elementwise_sources(
    view: GraphView, value: ValueRef, channels: int
) -> tuple[list[tuple[ConstRef, int]], str] | str:
    """Producer-side constants of `value` through elementwise ops back to linears, or a reason.

    Every value inside the region must be read only by ops of the region (or by the site's
    consumers), since all of it is stored permuted.
    """
    targets: list[tuple[ConstRef, int]] = []
    seen_ops: set[str] = set()
    path: list[str] = []
    stack = [value]
    inner: list[ValueRef] = []
    while stack:
        current = stack.pop()
        step = region_step(view, current, channels, _NORM_WHY)
        if isinstance(step, str):
            return step
        op, rows = step
        if op.name in seen_ops:
            continue
        seen_ops.add(op.name)
        if current != value:
            inner.append(current)
        if rows is not None:
            targets += rows
            path.append(f"{op.op_type} '{op.name}'")
            continue
        if op.kind in (OpKind.ACTIVATION, OpKind.CAST):
            acts = view.value_operands(op)
            if len(acts) != 1:
                return f"{op.op_type} '{op.name}' has {len(acts)} activation operands"
            stack.append(acts[0])
            continue
        if op.kind in _ELEMENTWISE_BINARY:
            for operand in view.op_inputs(op):
                if isinstance(operand, ConstRef):
                    if const_size(operand) == 1:
                        continue
                    if not is_channel_vector(operand, channels):
                        return f"{op.op_type} '{op.name}' constant {operand.shape} is not per-channel"
                    targets.append((operand, len(operand.shape) - 1))
                elif isinstance(operand, ValueRef):
                    if last_dim(view, operand) != channels:
                        return f"{op.op_type} '{op.name}' operand '{operand.name}' broadcasts over channels"
                    stack.append(operand)
            continue
        return f"producer {op.op_type} '{op.name}' is not elementwise or a linear"
    if not path:
        return "no linear producer"
    for v in inner:
        escaped = escape_reason(view, v, seen_ops)
        if escaped:
            return escaped
    # ONNX MatMul + Add(bias): the bias is found both as the Add's constant and as weight.bias
    unique = list({c.name: (c, a) for c, a in targets}.values())
    return unique, " + ".join(path)


def linear_input_site(view: GraphView, site: Site) -> PermutableSite | str:
    """Where a linear-input site's permutation folds, or why it cannot."""
    sinks = tuple((s.weight.const, s.weight.in_axis) for s in site.sinks)
    w_key = tuple(s.weight for s in site.sinks)
    absorber = find_absorber(view, site.value, site.channels)
    if isinstance(absorber, Absorber) and absorber.rotatable:  # only linear maps: any permutation folds
        period = absorber.period or site.channels
        return PermutableSite(
            site.label, site.value, site.channels, period, sinks, absorber.targets, w_key, "linear input"
        )
    found = elementwise_sources(view, site.value, site.channels)
    if isinstance(found, str):
        return found
    targets, _ = found
    shared = shared_constant(view, (c for c, _ in targets))
    if shared:
        return shared
    return PermutableSite(site.label, site.value, site.channels, site.channels, sinks, tuple(targets), w_key)


def trace_to_projection(
    view: GraphView, value: ValueRef
) -> tuple[OpRef, WeightRef, list[ConstRef], ValueRef] | str:
    """From a Q K^T operand up through head-layout ops to its projection linear.

    Returns (linear, weight, bias constants, the projection's output after biases), or why not.
    """
    current, biases, top = value, [], None
    while True:
        op = view.producer(current)
        if op is None:
            return f"'{current.name}' is a graph input"
        if view.is_graph_output(current) or len(view.consumers(current)) != 1:
            return f"'{current.name}' feeds other ops too (a K/V cache output?)"
        acts = view.value_operands(op)
        if op.kind in LAYOUT and acts:
            current = acts[0]
            continue
        if op.kind in _ELEMENTWISE_BINARY:
            pair = view.constant_operand(op)
            if pair is not None:
                const, act = pair
                if const_size(const) == 1 and op.kind in (OpKind.MUL, OpKind.DIV):  # softmax scale
                    current = act
                    continue
                if op.kind is OpKind.ADD and len(const.shape) == 1:  # projection bias
                    biases.append(const)
                    top = top or current
                    current = act
                    continue
            return (
                f"{op.op_type} '{op.name}' lies between the projection and Q K^T "
                "(RoPE? its rotate_half pairs dims i and i + d/2; a free permutation would break it)"
            )
        if op.kind is OpKind.LINEAR:
            weight = view.weight(op)
            if weight is None:
                return f"{op.op_type} '{op.name}' has no constant weight"
            if weight.bias is not None:
                biases.append(weight.bias)
            return op, weight, list({b.name: b for b in biases}.values()), top or current
        return (
            f"{op.op_type} '{op.name}' lies between the projection and Q K^T "
            "(RoPE? its rotate_half pairs dims i and i + d/2; a free permutation would break it)"
        )


def is_softmax_branch(view: GraphView, value: ValueRef) -> bool:
    current = value
    for _ in range(8):
        op = view.producer(current)
        if op is None:
            return False
        if op.kind is OpKind.SOFTMAX:
            return True
        acts = view.value_operands(op)
        if not acts or op.kind not in (*LAYOUT, OpKind.CAST):
            return False
        current = acts[0]
    return False


def k_cache_sites(view: GraphView) -> tuple[list[PermutableSite], list[tuple[str, str]]]:
    """Q K^T products whose Q and K come straight from projections; the K side is the cache."""
    sites, rejected = [], []
    for op in view.ops_of(OpKind.MATMUL):
        acts = view.value_operands(op)
        if len(acts) != 2 or is_softmax_branch(view, acts[0]):
            continue  # probs @ V, not Q K^T
        label = f"Q K^T '{op.name}'"
        shape = view.shape(acts[0])
        head = shape[-1] if shape and isinstance(shape[-1], int) else None
        if head is None:
            rejected.append((label, f"'{acts[0].name}' has no static head dimension"))
            continue
        q, k = (trace_to_projection(view, a) for a in acts)
        if isinstance(q, str) or isinstance(k, str):
            rejected.append((label, q if isinstance(q, str) else k))
            continue
        (q_op, q_w, q_b, _), (k_op, k_w, k_b, k_value) = q, k
        if q_w.out_features % head or k_w.out_features % head:
            rejected.append((label, f"projection widths are not multiples of the head size {head}"))
            continue
        sinks = ((q_w.const, q_w.out_axis), *((b, 0) for b in q_b))
        sources = ((k_w.const, k_w.out_axis), *((b, 0) for b in k_b))
        shared = shared_constant(view, (c for c, _ in (*sinks, *sources)))
        if shared:
            rejected.append((label, shared))
            continue
        sites.append(
            PermutableSite(
                f"{label}: {q_op.name}, {k_op.name}",
                k_value,
                k_w.out_features,
                head,
                sinks,
                sources,
                (k_w,),
                "K cache",
            )
        )
    return sites, rejected
