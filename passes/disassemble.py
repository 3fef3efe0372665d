"""QLLM channel disassembly: an outlier activation channel becomes T channels of x_c / T.

QLLM (Liu et al., 2024) splits each outlier channel c of a linear's input into T sub-channels
carrying x_c / T and repeats the weight column w_c for each: sum_t (x_c / T) w_c = x_c w_c, so
the function is unchanged while the activation's range (what its quantization scale must
cover) shrinks by T. The split is folded into constants, with no runtime op:

- the producer emits the copies itself: its output rows (and bias) for channel c are repeated
  T times, and on one branch scaled by 1/T. That is exact when the path from the producer
  linear to the activation is linear or positively homogeneous (ReLU(x / T) = ReLU(x) / T);
  an elementwise product (SwiGLU's act(gate) * up) has the copies made on both branches and
  the 1/T on the one that allows it (up). GELU or SiLU on the only branch does not commute
  with 1/T, and a norm producer would change its statistics if a channel were repeated
  (RMSNorm's mean of squares): such sites are skipped with the reason;
- every consumer linear's input column c is repeated T times (ExpandChannels).

T is chosen per channel from calibration: channels whose absmax exceeds a threshold theta get
T_c = ceil(absmax_c / theta). theta is searched per site to minimise a per-tensor
quantization-error proxy, (max_c absmax_c / T_c)^2 x (channels + added), under a budget of
added channels (`max_extra`, a fraction of the width), or fixed (`threshold`, a multiple of
the median channel absmax).

QLLM's assembly step (merge the most similar channel pairs so the width is unchanged) is not
applied: it replaces x_i w_i + x_j w_j by (x_i + x_j) / 2 (w_i + w_j), which is approximate,
and passes here must be exact. The activation and the consumers' inputs grow by the added
channels (reported per site), padded with zero channels to a multiple of the recipe's weight
group (`multiple_of`) so grouped weight quantization still tiles the widened input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qpass.calibration import StatRequest, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import EditPlan, ExpandChannels, SiteNote
from qpass.graph.refs import ConstRef, OpKind, ValueRef
from qpass.graph.regions import find_sites, is_channel_vector
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass


@dataclass(frozen=True)
class DisassembleConfig:
    """max_extra: added channels per site at most, as a fraction of its width; max_split: T at most;
    threshold: fixed theta as a multiple of the median channel absmax (None: searched per site).
    """

    max_extra: float = 0.1
    max_split: int = 64
    threshold: float | None = None
    multiple_of: int | None = None  # pad the new width with zero channels to a multiple (None: the
    # recipe's weight group, so grouped weight quantization still tiles the widened input)

    def __post_init__(self) -> None:
        if not 0.0 < self.max_extra <= 4.0:
            msg = f"recipe key 'disassemble.max_extra': expected a fraction in (0, 4], got {self.max_extra}"
            raise ConfigError(msg)
        if self.max_split < 2:
            msg = f"recipe key 'disassemble.max_split': must be >= 2, got {self.max_split}"
            raise ConfigError(msg)
        if self.multiple_of is not None and self.multiple_of < 1:
            msg = f"recipe key 'disassemble.multiple_of': must be >= 1, got {self.multiple_of}"
            raise ConfigError(msg)
        if self.threshold is not None and self.threshold <= 1.0:
            msg = f"recipe key 'disassemble.threshold': must be > 1 (x median absmax), got {self.threshold}"
            raise ConfigError(msg)


# ----------------------------------------------------------------------------- the split counts
def proxy_cost(absmax: torch.Tensor, splits: torch.Tensor) -> float:
    """Per-tensor quantization error proxy: squared range after splitting x channel count."""
    a = absmax.to(torch.float64)
    return float((a / splits).max() ** 2 * int(splits.sum()))


def choose_splits(absmax: torch.Tensor, cfg: DisassembleConfig) -> torch.Tensor:
    """T_c per channel (1 = left alone) from the calibrated per-channel absmax."""
    a = absmax.to(torch.float64)
    n = a.numel()
    ones = torch.ones(n, dtype=torch.long)
    budget = int(cfg.max_extra * n)
    if budget < 1:
        return ones

    def splits_for(theta: float) -> torch.Tensor:
        return torch.ceil(a / max(theta, 1e-30)).clamp(1, cfg.max_split).to(torch.long)

    if cfg.threshold is not None:
        t = splits_for(cfg.threshold * float(a.median()))
        extra = int(t.sum()) - n
        return t if extra <= budget else ones
    best, best_cost = ones, proxy_cost(a, ones)
    # theta's breakpoints: where some T_c = ceil(a_c / theta) steps, i.e. theta = a_c / k
    big = a[a > 2 * a.median()]
    ks = torch.arange(1, cfg.max_split + 1, dtype=torch.float64)
    candidates = torch.cat([(big[:, None] / ks[None, :]).reshape(-1), a.max().reshape(1)])
    for theta in torch.sort(candidates, descending=True).values.tolist():
        t = splits_for(theta)
        if int(t.sum()) - n > budget:
            break  # theta only falls from here: more channels
        cost = proxy_cost(a, t)
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def expansion(splits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, scale): channel c stays at c scaled 1/T_c; its T_c - 1 copies are appended."""
    n = splits.numel()
    extra = [c for c in range(n) for _ in range(int(splits[c]) - 1)]
    index = torch.cat([torch.arange(n), torch.tensor(extra, dtype=torch.long)])
    scale = 1.0 / splits[index].to(torch.float64)
    return index, scale


# ----------------------------------------------------------------------------- the producer side
@dataclass
class _Region:
    """Producer-side constants to repeat (and which of them take 1/T), and the widened values."""

    repeat: list[tuple[ConstRef, int]] = field(default_factory=list)
    scaled: set[str] = field(default_factory=set)
    values: list[ValueRef] = field(default_factory=list)
    ops: set[str] = field(default_factory=set)
    plain: set[str] = field(default_factory=set)  # constants repeated without the 1/T

    def merged(self, other: _Region) -> _Region:
        return _Region(
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
                return f"the shape of '{v.name}' is read by {shape_readers[0].op_type} '{shape_readers[0].name}'"
            if v == site:
                continue
            if view.is_graph_output(v):
                return f"intermediate '{v.name}' is a graph output"
            outside = [c for c in view.consumers(v) if c.name not in self.ops]
            if outside:
                return f"intermediate '{v.name}' also feeds {outside[0].op_type} '{outside[0].name}'"
        both = self.scaled & self.plain
        if both:
            return f"constant '{sorted(both)[0]}' is reached with and without the 1/T"
        return None


def _const_size(const: ConstRef) -> int:
    return math.prod(const.shape) if const.shape else 1


def _is_relu(op_type: str) -> bool:
    return "relu" in op_type.lower() and "leaky" not in op_type.lower()


def _walk(view: GraphView, value: ValueRef, channels: int, scale: bool) -> _Region | str:
    """The region producing `value` back to linears; `scale`: this branch must take the 1/T."""
    op = view.producer(value)
    if op is None:
        return f"'{value.name}' is a graph input"
    here = _Region(values=[value], ops={op.name})
    if op.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
        return (
            f"{op.op_type} '{op.name}' output: a norm cannot emit a repeated channel without changing "
            "its statistics (mean of squares), and a runtime gather would be a new op"
        )
    if op.kind is OpKind.LINEAR:
        w = view.weight(op)
        if w is None or w.out_features != channels:
            return f"{op.op_type} '{op.name}' output width does not match {channels} channels"
        consts = [(w.const, w.out_axis)] + ([(w.bias, 0)] if w.bias is not None else [])
        here.repeat += consts
        (here.scaled if scale else here.plain).update(c.name for c, _ in consts)
        return here
    acts = view.value_operands(op)
    if op.kind in (OpKind.CAST, OpKind.ACTIVATION):
        if len(acts) != 1:
            return f"{op.op_type} '{op.name}' has {len(acts)} activation operands"
        if scale and op.kind is OpKind.ACTIVATION and not _is_relu(op.op_type):
            return f"{op.op_type} '{op.name}': f(x / T) != f(x) / T, so the split cannot pass it"
        sub = _walk(view, acts[0], channels, scale)
        return sub if isinstance(sub, str) else here.merged(sub)
    if op.kind in (OpKind.ADD, OpKind.SUB, OpKind.MUL):
        pair = view.constant_operand(op)
        if pair is not None:
            const, act = pair
            if _const_size(const) == 1:
                if scale and op.kind is not OpKind.MUL:
                    return f"{op.op_type} '{op.name}' adds a scalar, which 1/T would change"
                sub = _walk(view, act, channels, scale)
                return sub if isinstance(sub, str) else here.merged(sub)
            if not is_channel_vector(const, channels):
                return f"{op.op_type} '{op.name}' constant {const.shape} is not per-channel"
            here.repeat.append((const, len(const.shape) - 1))
            (here.scaled if scale else here.plain).add(const.name)
            # a per-channel factor takes the 1/T itself; a per-channel offset needs it upstream too
            sub = _walk(view, act, channels, scale and op.kind is not OpKind.MUL)
            return sub if isinstance(sub, str) else here.merged(sub)
        if op.kind is OpKind.MUL and len(acts) == 2:
            narrow = [a for a in acts if _last_dim(view, a) != channels]
            if narrow:
                return f"{op.op_type} '{op.name}' operand '{narrow[0].name}' broadcasts over channels"
            if not scale:
                subs = [_walk(view, a, channels, False) for a in acts]
                bad = [s for s in subs if isinstance(s, str)]
                return bad[0] if bad else here.merged(subs[0]).merged(subs[1])
            reasons = []
            for i in (1, 0):  # prefer the second factor (SwiGLU: act(gate) * up)
                scaled = _walk(view, acts[i], channels, True)
                plain = _walk(view, acts[1 - i], channels, False)
                if isinstance(scaled, str) or isinstance(plain, str):
                    reasons.append(scaled if isinstance(scaled, str) else plain)
                    continue
                return here.merged(scaled).merged(plain)
            return f"{op.op_type} '{op.name}': neither factor can take 1/T ({'; '.join(reasons)})"
        return f"{op.op_type} '{op.name}' combines two activations"
    if op.kind in (OpKind.RESHAPE, OpKind.TRANSPOSE, OpKind.EXPAND):
        return (
            f"{op.op_type} '{op.name}' (head layout): a repeated channel would change the head size "
            "the attention reshapes expect"
        )
    return f"producer {op.op_type} '{op.name}' is not a linear, ReLU or elementwise product"


def _last_dim(view: GraphView, value: ValueRef) -> int | None:
    shape = view.shape(value)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


# ----------------------------------------------------------------------------- the pass
class Disassemble(QPass):
    """Split outlier input channels of linears into T scaled copies (exact; the width grows)."""

    name = "disassemble"

    def _sites(self, view: GraphView):
        usable, notes = [], []
        sites, rejected = find_sites(view)
        notes += [SiteNote(label, False, why) for label, why in rejected]
        for site in sites:
            if view.is_graph_output(site.value):
                notes.append(
                    SiteNote(site.label, False, f"'{site.value.name}' is a graph output (its width is fixed)")
                )
                continue
            region = _walk(view, site.value, site.channels, True)
            if not isinstance(region, str):
                region = region.check(view, site.value) or region
            if isinstance(region, str):
                notes.append(SiteNote(site.label, False, region))
                continue
            shared = [
                c
                for c, _ in region.repeat + [(s.weight.const, 0) for s in site.sinks]
                if view.const_users(c) != 1
            ]
            if shared:
                notes.append(
                    SiteNote(site.label, False, f"constant '{shared[0].name}' is shared by other ops")
                )
                continue
            if not region.scaled:
                notes.append(SiteNote(site.label, False, "no constant on the path can take 1/T"))
                continue
            usable.append((site, region))
        return usable, notes

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        return [StatRequest(site.value) for site, _ in self._sites(view)[0]]

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        usable, notes = self._sites(view)
        plan = EditPlan(self.name, notes=notes)
        for site, region in usable:
            absmax = stats[site.value].absmax.to(torch.float64).reshape(-1)
            splits = choose_splits(absmax, self.config)
            added = int(splits.sum()) - splits.numel()
            if added == 0:
                plan.notes.append(SiteNote(site.label, False, "no channel worth splitting within the budget"))
                continue
            index, scale = expansion(splits)
            multiple = self.config.multiple_of or (
                ctx.weights.group if ctx.weights and ctx.weights.group else 1
            )
            pad = (-index.numel()) % multiple
            if pad:  # zero channels: the scaled constants emit 0 there, whatever the consumers read
                index = torch.cat([index, torch.zeros(pad, dtype=torch.long)])
                scale = torch.cat([scale, torch.zeros(pad, dtype=torch.float64)])
            added = index.numel() - splits.numel()
            values = tuple(dict.fromkeys(region.values))
            unique = {c.name: (c, a) for c, a in region.repeat}
            for name, (const, axis) in unique.items():
                factors = scale if name in region.scaled else None
                plan.edits.append(ExpandChannels(const, axis, index, factors, values, site=site.label))
            for sink in site.sinks:
                w = sink.weight
                plan.edits.append(ExpandChannels(w.const, w.in_axis, index, None, values, site=site.label))
            split = int((splits > 1).sum())
            before = float(absmax.max())
            after = float((absmax / splits).max())
            plan.notes.append(
                SiteNote(
                    site.label,
                    True,
                    f"{split} outlier channels split into {int(splits[splits > 1].sum())} "
                    f"(T up to {int(splits.max())}{f', {pad} zero channels' if pad else ''}); "
                    f"width {splits.numel()} -> {splits.numel() + added} "
                    f"(+{added}, no assembly: QLLM's merge is approximate); absmax {before:.3g} -> {after:.3g}",
                )
            )
        return plan
