"""The QuaRot layout: one rotation Q fused offline into the whole residual stream.

The residual stream is found from graph structure, not names (`streams`): the values joined by
residual Adds (two activations of the same static width) or by norms that sum their inputs (ONNX
Runtime's Skip norms: they read the stream too, and must have their gamma fused), plus casts.
Every op that writes into it must emit x Q instead of x, every op that reads it must undo Q:
- writers: a linear (o_proj, down_proj: Q on its output rows and bias), an embedding lookup
  from a constant table (Q on the table's columns); a graph input, or an embedding whose table is
  shared with another op (tied lm_head), gets an inserted x @ Q after it (online);
- readers: a gamma-free RMSNorm (decomposed x * rsqrt(mean(x^2) + eps) or a fused op) commutes
  with Q, RMSNorm(x Q) = RMSNorm(x) Q, and its output linears take Q in their input columns;
  a gamma-free LayerNorm commutes with any Q that keeps the all-ones direction (1 Q = 1: the mean
  and the centred norm are then unchanged), so components with LayerNorm readers get such a Q;
  a linear reading the stream directly takes Q in its input columns; a norm that still carries a
  per-channel gamma (fuse_norms could not fold it, e.g. into a tied lm_head), or whose output
  does not only feed linears, reads the stream through an inserted x @ Q^T (online).
Any other reader or writer (a post-LN LayerNorm writing the stream, a graph output) leaves the
whole component unrotated, with the reason in the report. Run fuse_norms first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qpass.graph.edits import Edit, InsertRotation, RotateChannels, SiteNote
from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef
from qpass.graph.regions.absorbers import find_absorber
from qpass.graph.regions.sites import is_channel_vector, last_dim
from qpass.graph.regions.streams import SQUARE_OPS, Component, components, only_one_act
from qpass.graph.view import GraphView

MatrixFn = Callable[[int], tuple[torch.Tensor, str]]

_MEAN_OPS = ("mean", "ReduceMean", "sum", "ReduceSum")  # sum of squares: invariant under rotation
_EMBEDDING_OPS = ("embedding", "Gather")


@dataclass
class ResidualPlan:
    """Edits rotating every residual stream that can take it, notes, and the linear inputs covered."""

    edits: list[Edit] = field(default_factory=list)
    notes: list[SiteNote] = field(default_factory=list)
    covered: set[str] = field(default_factory=set)  # values whose consumer linears now take Q


@dataclass
class _Norm:
    """A normalisation reading a stream value: the ops that read it and the value it emits."""

    readers: tuple[OpRef, ...]  # the ops of the norm that read the stream value
    output: ValueRef  # normalised value after the (uniform) gamma and casts
    layer_norm: bool  # subtracts the mean: needs a Q with 1 Q = 1
    gamma: ConstRef | None  # a per-channel gamma that is not uniform (prevents commuting)


def _skip_casts(view: GraphView, value: ValueRef) -> ValueRef:
    """Follow a chain of single-consumer casts forward."""
    while True:
        users = [c for c in view.consumers(value) if c.kind is not OpKind.SHAPE_OF]
        if len(users) == 1 and users[0].kind is OpKind.CAST and only_one_act(view, users[0]):
            value = view.op_output(users[0])
        else:
            return value


def _uniform(view: GraphView, const: ConstRef | None) -> bool:
    if const is None:
        return True
    t = view.read(const).to(torch.float64).reshape(-1)  # fused gammas are 1 up to float rounding
    return bool(((t - t[0]).abs() <= 1e-6 * t[0].abs()).all()) and bool(t[0] != 0)


def _after_gamma(view: GraphView, value: ValueRef, width: int) -> tuple[ValueRef, ConstRef | None]:
    """Past the casts and a per-channel gamma Mul (if any): the norm's output and its gamma."""
    value = _skip_casts(view, value)
    users = [c for c in view.consumers(value) if c.kind is not OpKind.SHAPE_OF]
    if len(users) == 1 and users[0].kind is OpKind.MUL:
        found = view.constant_operand(users[0])
        if found is not None and is_channel_vector(found[0], width):
            gamma = None if _uniform(view, found[0]) else found[0]
            return _skip_casts(view, view.op_output(users[0])), gamma
    return value, None


def _rms_norm_at(view: GraphView, value: ValueRef, mul: OpRef, width: int) -> _Norm | str:
    """`mul` = value * r with r a per-row function of sum(value^2): a decomposed RMSNorm."""
    acts = view.value_operands(mul)
    if len(acts) != 2 or value not in acts or acts[0] == acts[1]:
        return f"{mul.op_type} '{mul.name}' multiplies the stream by another activation"
    scale = acts[1] if acts[0] == value else acts[0]
    readers = [mul]
    current, reduced = scale, False
    while True:
        if last_dim(view, current) != 1 and not reduced:
            return f"{mul.op_type} '{mul.name}': the multiplier is not one value per row"
        users = [c for c in view.consumers(current) if c.kind is not OpKind.SHAPE_OF]
        if len(users) != 1:
            return f"'{current.name}' inside the norm feeds other ops"
        op = view.producer(current)
        if op is None or not only_one_act(view, op):
            return f"'{current.name}' is not computed from the stream alone"
        (src,) = view.value_operands(op)
        if src == value:
            if op.op_type not in SQUARE_OPS:
                return f"{op.op_type} '{op.name}' reads the stream inside the norm (not a square)"
            if not reduced:
                return f"no mean over the channels between '{op.name}' and '{mul.name}'"
            readers.append(op)
            out, gamma = _after_gamma(view, view.op_output(mul), width)
            return _Norm(tuple(readers), out, layer_norm=False, gamma=gamma)
        if last_dim(view, src) == width and last_dim(view, current) == 1:
            if op.op_type not in _MEAN_OPS:
                return f"{op.op_type} '{op.name}' reduces the channels but is not a mean or sum"
            reduced = True
        current = src


def _fused_norm(view: GraphView, op: OpRef, width: int) -> _Norm | str:
    params = view.norm_params(op)
    if params is None:
        return f"{op.op_type} '{op.name}' does not normalise over the channel axis only"
    gamma = None if _uniform(view, params.gamma) else params.gamma
    if params.beta is not None and bool(view.read(params.beta).any()):
        gamma = gamma or params.beta  # a beta added after the norm does not commute either
    out, extra = _after_gamma(view, view.op_output(op), width)
    return _Norm((op,), out, op.kind is OpKind.LAYER_NORM, gamma or extra)


def _linear_readers(view: GraphView, value: ValueRef, width: int) -> list[OpRef] | str:
    """The linears reading `value`, if all of its readers are unshared constant-weight linears."""
    out = []
    for c in view.consumers(value):
        if c.kind is OpKind.SHAPE_OF:
            continue
        w = view.weight(c) if c.kind is OpKind.LINEAR else None
        if w is None or w.in_features != width:
            return f"'{value.name}' feeds {c.op_type} '{c.name}' (not a linear)"
        if view.const_users(w.const) != 1:
            return f"weight '{w.const.name}' of '{c.name}' is shared (tied)"
        out.append(c)
    return out


def _embedding_table(view: GraphView, op: OpRef, width: int) -> ConstRef | None:
    if op.op_type not in _EMBEDDING_OPS:
        return None
    ins = view.op_inputs(op)
    if len(ins) != 2 or not isinstance(ins[0], ConstRef) or not isinstance(ins[1], ValueRef):
        return None
    table = ins[0]
    return table if len(table.shape) == 2 and table.shape[1] == width else None


def _fix_ones(q: torch.Tensor) -> torch.Tensor:
    """Q P with P the reflection taking 1 Q back to 1: still orthogonal, and 1 (Q P) = 1."""
    ones = torch.ones(q.shape[0], dtype=torch.float64)
    w = ones @ q
    v = w - ones
    norm2 = float(v @ v)
    if norm2 < 1e-12:
        return q
    return q - torch.outer(q @ v, v) * (2.0 / norm2)


@dataclass
class _Rewrite:
    """What one component needs, collected before any edit is emitted."""

    offline: list[tuple[ConstRef, int]] = field(default_factory=list)  # rotate by Q along axis
    writers_online: list[ValueRef] = field(default_factory=list)  # x @ Q inserted after
    readers_online: list[tuple[ValueRef, tuple[OpRef, ...]]] = field(default_factory=list)  # x @ Q^T
    covered: list[str] = field(default_factory=list)
    layer_norm: bool = False
    described: list[str] = field(default_factory=list)


def _plan_component(view: GraphView, comp: Component) -> _Rewrite | str:
    d, rw = comp.width, _Rewrite()
    rotated: set[str] = set()
    values = sorted(comp.values)
    for name in values:
        value = ValueRef(name)
        if view.is_graph_output(value):
            return f"stream value '{name}' is a graph output"
        prod = view.producer(value)
        if prod is None:
            rw.writers_online.append(value)
            rw.described.append(f"input '{name}' (online)")
        elif prod.name not in comp.adds and prod.name not in comp.casts:
            failed = _plan_writer(view, prod, value, d, rw, rotated)
            if failed:
                return failed
    for name in values:
        failed = _plan_readers(view, comp, ValueRef(name), rw)
        if failed:
            return failed
    for op in comp.fused.values():
        failed = _plan_fused_norm(view, op, d, rw)
        if failed:
            return failed
    if not rw.covered:
        return "no reader takes the rotation offline: " + "; ".join(d for d in rw.described if "inverse" in d)
    return rw


def _plan_writer(
    view: GraphView, prod: OpRef, value: ValueRef, d: int, rw: _Rewrite, rotated: set[str]
) -> str | None:
    table = _embedding_table(view, prod, d)
    if table is not None and view.const_users(table) == 1:
        rw.offline.append((table, 1))
        rw.described.append(f"{prod.op_type} '{prod.name}' table")
        return None
    if table is not None:
        rw.writers_online.append(value)
        rw.described.append(f"{prod.op_type} '{prod.name}' (table shared, online)")
        return None
    if prod.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
        return f"{prod.op_type} '{prod.name}' writes the stream (post-LN): a norm's output cannot carry Q"
    found = find_absorber(view, value, d)
    if isinstance(found, str) or not found.rotatable or found.period is not None:
        why = found if isinstance(found, str) else f"{prod.op_type} '{prod.name}' scales channels"
        return f"writer of '{value.name}' cannot take the rotation: {why}"
    rw.offline += [t for t in found.targets if t[0].name not in rotated]
    rotated.update(t[0].name for t in found.targets)
    rw.described.append(f"{prod.op_type} '{prod.name}'")
    return None


def _plan_readers(view: GraphView, comp: Component, value: ValueRef, rw: _Rewrite) -> str | None:
    d = comp.width
    consumers = [
        c
        for c in view.consumers(value)
        if c.name not in comp.adds and c.name not in comp.casts and c.kind is not OpKind.SHAPE_OF
    ]
    direct = [c for c in consumers if c.kind is OpKind.LINEAR]
    if direct:
        linears = _linear_readers(view, value, d)
        if isinstance(linears, str) or len(linears) != len(consumers):
            return f"stream value '{value.name}' feeds linears and other ops"
        rw.offline += [(view.weight(c).const, view.weight(c).in_axis) for c in linears]
        rw.covered.append(value.name)
        rw.described += [f"{c.op_type} '{c.name}' (direct)" for c in linears]
        return None
    muls = [c for c in consumers if c.kind is OpKind.MUL]
    fused = [c for c in consumers if c.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM)]
    if len(fused) == 1 and len(consumers) == 1:
        norm = _fused_norm(view, fused[0], d)
    elif len(muls) == 1 and len(consumers) == 2:
        norm = _rms_norm_at(view, value, muls[0], d)
        if isinstance(norm, _Norm) and set(norm.readers) != set(consumers):
            norm = f"'{value.name}' feeds ops outside its norm"
    elif not consumers:
        return None
    else:
        c = consumers[0]
        return f"stream value '{value.name}' is read by {c.op_type} '{c.name}' (not a norm or linear)"
    if isinstance(norm, str):
        return norm
    linears = _linear_readers(view, norm.output, d)
    if norm.gamma is not None or isinstance(linears, str):
        why = f"'{norm.gamma.name}' not fused" if norm.gamma is not None else linears
        rw.readers_online.append((value, norm.readers))
        rw.described.append(f"norm at '{norm.readers[0].name}' (online inverse: {why})")
        return None
    rw.layer_norm |= norm.layer_norm
    rw.offline += [(view.weight(c).const, view.weight(c).in_axis) for c in linears]
    rw.covered.append(norm.output.name)
    rw.described.append(f"norm at '{norm.readers[0].name}' -> {len(linears)} linears")
    return None


def _plan_fused_norm(view: GraphView, op: OpRef, d: int, rw: _Rewrite) -> str | None:
    """A norm that sums stream values and normalises the sum (a Skip norm): the sum stays in the
    stream, so the norm cannot read through an inserted inverse. It commutes with Q once its gamma
    is fused; its bias joins the stream (Q on it) and its output linears take Q in their columns.
    """
    norm = _fused_norm(view, op, d)
    if isinstance(norm, str):
        return norm
    if norm.gamma is not None:
        return f"{op.op_type} '{op.name}' sums into the stream with a per-channel gamma (run fuse_norms)"
    linears = _linear_readers(view, norm.output, d)
    if isinstance(linears, str):
        return f"{op.op_type} '{op.name}' output: {linears}"
    bias = view.residual_sum(op).bias
    if bias is not None:
        rw.offline.append((bias, len(bias.shape) - 1))
    rw.layer_norm |= norm.layer_norm
    rw.offline += [(view.weight(c).const, view.weight(c).in_axis) for c in linears]
    rw.covered.append(norm.output.name)
    rw.described.append(f"fused norm at '{op.name}' -> {len(linears)} linears")
    return None


def plan_residual(view: GraphView, matrix: MatrixFn) -> ResidualPlan:
    """Rotate each residual component that every writer and reader can absorb (see module doc)."""
    out = ResidualPlan()
    for comp in components(view):
        label = f"residual stream of {len(comp.adds)} adds (width {comp.width})"
        rw = _plan_component(view, comp)
        if isinstance(rw, str):
            out.notes.append(SiteNote(label, False, rw))
            continue
        q, construction = matrix(comp.width)
        q = q.to(torch.float64)
        if rw.layer_norm:
            q = _fix_ones(q)
            construction += ", reflected so that 1 Q = 1 (LayerNorm readers)"
        for const, axis in rw.offline:
            out.edits.append(RotateChannels(const, axis, q, site=label))
        unrotated = {v.name: {r.name for r in readers} for v, readers in rw.readers_online}
        for value in rw.writers_online:  # readers needing x itself keep reading the original
            keep = unrotated.pop(value.name, set()) | {"<output>"}
            users = tuple(c for c in view.consumers(value) if c.name not in keep)
            out.edits.append(InsertRotation(value, users, q.to(torch.float32), site=label))
        for value, readers in rw.readers_online:
            if value.name not in unrotated:
                continue
            out.edits.append(InsertRotation(value, readers, q.T.contiguous().to(torch.float32), site=label))
        out.covered.update(rw.covered)
        online = len(rw.writers_online) + len(rw.readers_online)
        detail = (
            f"{construction} ({comp.width}x{comp.width}) offline into {len(rw.offline)} constants"
            + (f", {online} online" if online else "")
            + f": {'; '.join(rw.described)}"
        )
        out.notes.append(SiteNote(label, True, detail))
    return out
