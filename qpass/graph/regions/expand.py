"""Channel-expansion regions: the producer side of a linear input whose channels are split
into scaled copies (`disassemble`): every constant to repeat along its channel axis, which of
them take the 1/T (one branch of a product, a linear's rows, per-channel factors), and the
widened values, which must not be read outside the region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qpass.graph.refs import ConstRef, OpKind, ValueRef
from qpass.graph.regions.sites import (
    HEAD_LAYOUT,
    Site,
    const_size,
    escape_reason,
    is_channel_vector,
    last_dim,
    region_step,
)
from qpass.graph.view import GraphView


@dataclass
class ExpansionRegion:
    """Producer-side constants to repeat (and which of them take 1/T), and the widened values."""

    repeat: list[tuple[ConstRef, int]] = field(default_factory=list)
    scaled: set[str] = field(default_factory=set)
    values: list[ValueRef] = field(default_factory=list)
    ops: set[str] = field(default_factory=set)
    plain: set[str] = field(default_factory=set)  # constants repeated without the 1/T

    def merged(self, other: ExpansionRegion) -> ExpansionRegion:
        return ExpansionRegion(
            self.repeat + other.repeat,
            self.scaled | other.scaled,
            self.values + other.values,
            self.ops | other.ops,
            self.plain | other.plain,
        )

    def check(self, view: GraphView, site: ValueRef) -> str | None:
        """Every widened value is read only inside the region; no constant both scaled and not."""
        for v in [site, *self.values]:
            shape_readers = [c for c in view.consumers(v) if c.kind is OpKind.SHAPE_OF]
            if shape_readers:  # e.g. an attention reshape sized from it: its width must not change
                return (
                    f"the shape of '{v.name}' is read by {shape_readers[0].op_type} '{shape_readers[0].name}'"
                )
            escaped = None if v == site else escape_reason(view, v, self.ops)
            if escaped:
                return escaped
        both = self.scaled & self.plain
        if both:
            return f"constant '{sorted(both)[0]}' is reached with and without the 1/T"
        return None


def _is_relu(op_type: str) -> bool:
    return "relu" in op_type.lower() and "leaky" not in op_type.lower()


_NORM_WHY = (
    "a norm cannot emit a repeated channel without changing its statistics (mean of squares), "
    "and a runtime gather would be a new op"
)


def expansion_region(view: GraphView, value: ValueRef, channels: int, scale: bool) -> ExpansionRegion | str:
    """The region producing `value` back to linears; `scale`: this branch must take the 1/T."""
    step = region_step(view, value, channels, _NORM_WHY)
    if isinstance(step, str):
        return step
    op, consts = step
    here = ExpansionRegion(values=[value], ops={op.name})
    if consts is not None:
        here.repeat += consts
        (here.scaled if scale else here.plain).update(c.name for c, _ in consts)
        return here
    acts = view.value_operands(op)
    if op.kind in (OpKind.CAST, OpKind.ACTIVATION):
        if len(acts) != 1:
            return f"{op.op_type} '{op.name}' has {len(acts)} activation operands"
        if scale and op.kind is OpKind.ACTIVATION and not _is_relu(op.op_type):
            return f"{op.op_type} '{op.name}': f(x / T) != f(x) / T, so the split cannot pass it"
        sub = expansion_region(view, acts[0], channels, scale)
        return sub if isinstance(sub, str) else here.merged(sub)
    if op.kind in (OpKind.ADD, OpKind.SUB, OpKind.MUL):
        pair = view.constant_operand(op)
        if pair is not None:
            const, act = pair
            if const_size(const) == 1:
                if scale and op.kind is not OpKind.MUL:
                    return f"{op.op_type} '{op.name}' adds a scalar, which 1/T would change"
                sub = expansion_region(view, act, channels, scale)
                return sub if isinstance(sub, str) else here.merged(sub)
            if not is_channel_vector(const, channels):
                return f"{op.op_type} '{op.name}' constant {const.shape} is not per-channel"
            here.repeat.append((const, len(const.shape) - 1))
            (here.scaled if scale else here.plain).add(const.name)
            # a per-channel factor takes the 1/T itself; a per-channel offset needs it upstream too
            sub = expansion_region(view, act, channels, scale and op.kind is not OpKind.MUL)
            return sub if isinstance(sub, str) else here.merged(sub)
        if op.kind is OpKind.MUL and len(acts) == 2:
            narrow = [a for a in acts if last_dim(view, a) != channels]
            if narrow:
                return f"{op.op_type} '{op.name}' operand '{narrow[0].name}' broadcasts over channels"
            if not scale:
                subs = [expansion_region(view, a, channels, False) for a in acts]
                bad = [s for s in subs if isinstance(s, str)]
                return bad[0] if bad else here.merged(subs[0]).merged(subs[1])
            reasons = []
            for i in (1, 0):  # prefer the second factor (SwiGLU: act(gate) * up)
                scaled = expansion_region(view, acts[i], channels, True)
                plain = expansion_region(view, acts[1 - i], channels, False)
                if isinstance(scaled, str) or isinstance(plain, str):
                    reasons.append(scaled if isinstance(scaled, str) else plain)
                    continue
                return here.merged(scaled).merged(plain)
            return f"{op.op_type} '{op.name}': neither factor can take 1/T ({'; '.join(reasons)})"
        return f"{op.op_type} '{op.name}' combines two activations"
    if op.kind in HEAD_LAYOUT:
        return (
            f"{op.op_type} '{op.name}' (head layout): a repeated channel would change the head size "
            "the attention reshapes expect"
        )
    return f"producer {op.op_type} '{op.name}' is not a linear, ReLU or elementwise product"


def expansion_site(view: GraphView, site: Site) -> ExpansionRegion | str:
    """The region whose channels are repeated for `site`, or why its width cannot change."""
    if view.is_graph_output(site.value):
        return f"'{site.value.name}' is a graph output (its width is fixed)"
    region = expansion_region(view, site.value, site.channels, True)
    if isinstance(region, str):
        return region
    failed = region.check(view, site.value)
    if failed:
        return failed
    consts = [c for c, _ in region.repeat] + [s.weight.const for s in site.sinks]
    shared = [c for c in consts if view.const_users(c) != 1]
    if shared:
        return f"constant '{shared[0].name}' is shared by other ops"
    if not region.scaled:
        return "no constant on the path can take 1/T"
    return region
