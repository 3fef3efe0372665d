"""Conv -> (positively homogeneous op) -> Conv chains: where a per-channel factor can cross
between two convs exactly (cross-layer equalization).

Conv1's output channel c divided by s_c, then f, then conv2 reading channel c multiplied by s_c,
is the same function iff f(x / s) = f(x) / s for s > 0: identity, casts and ReLU / LeakyReLU
(positive homogeneity). A bounded clamp (ReLU6, Clip(0, 6)) is not: clip(x / s, 0, 6) * s =
clip(x, 0, 6 s), which would need the bound 6 s_c per channel, and a Clip's bounds are scalars.

Channel mapping in conv2 (weight [out, in/groups, k...]): a dense conv reads channel c through
its input axis (axis 1); a depthwise conv (in/groups = 1, `m` outputs per channel) reads it only
through its output rows c*m .. c*m+m-1 (axis 0), so the factor goes there. Other grouped convs
(1 < in/groups < in) would need a factor per (row, column) pattern and are skipped with the reason.

BatchNorm is expected folded (the ONNX export folds it into the conv); an unfolded BatchNorm
between the convs (torch.fx keeps it) ends the chain with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.graph.edits import Edit, ScaleChannels
from qpass.graph.refs import OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.regions.sites import shared_constant
from qpass.graph.view import GraphView

_HOMOGENEOUS = ("LeakyRelu", "leaky_relu")  # besides clamps whose bounds are 0 / +-inf


@dataclass(frozen=True)
class ConvPair:
    """Two convs with only positively homogeneous ops between them (`between`, in order)."""

    first: OpRef
    second: OpRef
    first_w: WeightRef
    second_w: WeightRef
    between: tuple[OpRef, ...]

    @property
    def label(self) -> str:
        via = "".join(f" -> {op.op_type}" for op in self.between)
        return f"{self.first.name}{via} -> {self.second.name}"

    @property
    def channels(self) -> int:
        return self.first_w.out_features

    @property
    def depthwise_multiplier(self) -> int | None:
        """Outputs per input channel when conv2 is depthwise, None when it is dense."""
        w = self.second_w.const.shape
        return w[0] // self.channels if w[1] == 1 and self.channels > 1 else None


def _homogeneous_reason(view: GraphView, op: OpRef) -> str | None:
    """Why f(x / s) != f(x) / s for op, or None when it is positively homogeneous."""
    if op.kind is OpKind.CAST:
        return None
    if op.kind is OpKind.ACTIVATION:
        if op.op_type in _HOMOGENEOUS:
            return None
        bounds = view.clip_bounds(op)
        if bounds is not None and bounds[0] in (0.0, float("-inf")) and bounds[1] == float("inf"):
            return None
        if bounds is not None:
            return (
                f"{op.op_type} '{op.name}' clamps at {bounds[1]:g}: clip(x/s) * s moves the bound to "
                f"{bounds[1]:g}*s per channel, which a scalar bound cannot hold"
            )
        return f"{op.op_type} '{op.name}' is not positively homogeneous (f(x/s) != f(x)/s)"
    return f"{op.op_type} '{op.name}' follows the conv and is not a positively homogeneous elementwise op"


def _pair_from(view: GraphView, first: OpRef, w1: WeightRef) -> ConvPair | str:
    value: ValueRef = view.op_output(first)
    between: list[OpRef] = []
    while True:
        if view.is_graph_output(value):
            return f"'{value.name}' is a graph output"
        readers = [c for c in view.consumers(value) if c.kind is not OpKind.SHAPE_OF]
        if len(readers) != 1:
            return f"'{value.name}' feeds {len(readers)} ops (a residual or a branch)"
        op = readers[0]
        if op.kind is OpKind.CONV:
            w2 = view.weight(op)
            if w2 is None or view.linear_input(op) != value:
                return f"Conv '{op.name}' has no constant weight on this input"
            return _checked_pair(view, ConvPair(first, op, w1, w2, tuple(between)))
        why = _homogeneous_reason(view, op)
        if why is not None:
            return why
        acts = view.value_operands(op)
        if len(acts) != 1:
            return f"{op.op_type} '{op.name}' has {len(acts)} activation operands"
        between.append(op)
        value = view.op_output(op)


def _checked_pair(view: GraphView, pair: ConvPair) -> ConvPair | str:
    w1, w2 = pair.first_w.const.shape, pair.second_w.const.shape
    if w2[1] != w1[0] and w2[1] != 1:
        return (
            f"Conv '{pair.second.name}' is grouped ({w1[0] // w2[1]} groups of {w2[1]} channels): "
            "only dense and depthwise convs take one factor per input channel"
        )
    if pair.depthwise_multiplier is None and w2[1] != w1[0]:
        return f"Conv '{pair.second.name}' reads {w2[1]} channels, '{pair.first.name}' emits {w1[0]}"
    consts = [pair.first_w.const, pair.second_w.const]
    consts += [pair.first_w.bias] if pair.first_w.bias is not None else []
    return shared_constant(view, consts) or pair


def conv_pairs(view: GraphView) -> tuple[list[ConvPair], list[tuple[str, str]]]:
    """Every conv whose output reaches exactly one conv through homogeneous ops; (conv, reason) for the rest."""
    pairs, skipped = [], []
    for op in view.ops(frozenset({OpKind.CONV})):
        w = view.weight(op)
        if w is None:
            continue
        found = _pair_from(view, op, w)
        if isinstance(found, str):
            skipped.append((f"{op.name} -> ?", found))
        else:
            pairs.append(found)
    return pairs, skipped


def output_absmax(pair: ConvPair, w1: torch.Tensor) -> torch.Tensor:
    """Per output channel of conv1: max |W1[c, ...]|."""
    return w1.abs().flatten(1).amax(1)


def input_absmax(pair: ConvPair, w2: torch.Tensor) -> torch.Tensor:
    """Per input channel of conv2: the largest |weight| reading it (grouped mapping for depthwise)."""
    m = pair.depthwise_multiplier
    if m is not None:
        return w2.abs().flatten(1).amax(1).view(pair.channels, m).amax(1)
    return w2.abs().transpose(0, 1).flatten(1).amax(1)


def scale_input(pair: ConvPair, w2: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """conv2's weight with its input channel c multiplied by s_c."""
    m = pair.depthwise_multiplier
    if m is not None:
        return w2 * s.repeat_interleave(m).view(-1, *([1] * (w2.dim() - 1))).to(w2.dtype)
    return w2 * s.view(1, -1, *([1] * (w2.dim() - 2))).to(w2.dtype)


def equalize_edits(pair: ConvPair, s: torch.Tensor) -> list[Edit]:
    """Edits dividing conv1's output channel c (rows and bias) by s_c and multiplying what conv2 reads of it."""
    label = pair.label
    edits: list[Edit] = [ScaleChannels(pair.first_w.const, 0, 1.0 / s, site=label)]
    if pair.first_w.bias is not None:
        edits.append(ScaleChannels(pair.first_w.bias, 0, 1.0 / s, site=label))
    m = pair.depthwise_multiplier
    if m is not None:
        edits.append(ScaleChannels(pair.second_w.const, 0, s.repeat_interleave(m), site=label))
    else:
        edits.append(ScaleChannels(pair.second_w.const, 1, s, site=label))
    return edits
