"""The edits a pass may ask for, and the `EditPlan` that carries them with per-site notes.

Passes never rewrite a graph: they return an `EditPlan` (plain data over `refs`) and the
`GraphView` adapter applies it. The edit set is closed; `GraphView.apply` dispatches on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qpass.graph.refs import ConstRef, OpRef, ValueRef


@dataclass(frozen=True)
class ScaleChannels:
    """Multiply a constant by `factors` along `axis` (broadcast over the other axes)."""

    const: ConstRef
    axis: int
    factors: torch.Tensor
    site: str = ""


@dataclass(frozen=True)
class ShiftChannels:
    """Add `delta` to a constant (same shape as the constant)."""

    const: ConstRef
    delta: torch.Tensor
    site: str = ""


@dataclass(frozen=True)
class PermuteChannels:
    """Reorder a constant along `axis`: t'[.., i, ..] = t[.., perm[i], ..].

    Applied to a producer's output axis and to every consumer's input axis with the same
    `perm`, the activation between them is stored reordered and the function is unchanged.
    """

    const: ConstRef
    axis: int
    perm: torch.Tensor
    site: str = ""


@dataclass(frozen=True)
class ExpandChannels:
    """Rebuild a constant along `axis` from its own channels: t'[.., i, ..] = scale[i] * t[.., index[i], ..].

    The axis may grow. Channel disassembly (QLLM) has the producer emit an outlier channel c as
    T copies of x_c / T (index repeats c, scale 1/T) and every consumer read each copy with
    the column of x_c (index only): the function is unchanged, the activation is wider and its
    range smaller. `values` are the activations whose last dimension becomes len(index): the
    adapters update their recorded shapes. Shapes change, so restoring constants cannot undo it.
    """

    const: ConstRef
    axis: int
    index: torch.Tensor
    scale: torch.Tensor | None = None
    values: tuple[ValueRef, ...] = ()
    site: str = ""


@dataclass(frozen=True)
class SplitOp:
    """Replace one linear y = x W^T + b by parts whose outputs are summed: y = sum_i x W_i^T + b_i.

    `weights` are canonical [out, in] parts and `biases` their biases (None: no bias). The
    adapters emit one linear with the parts' rows concatenated ([k * out, in], so each part
    keeps its own per-row quantization scales), then unflatten the last axis to [k, out] and
    sum over k: three ops for any k instead of k linears and k - 1 adds.
    """

    op: OpRef
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    site: str = ""


@dataclass(frozen=True)
class RotateChannels:
    """Contract a constant's `axis` with an orthogonal matrix: t'[.., i, ..] = sum_j t[.., j, ..] Q[j, i].

    On a consumer weight's input axis this is W' = W Q; on a producer's output axis it rotates
    what the producer emits, so x Q flows into the consumers.
    """

    const: ConstRef
    axis: int
    matrix: torch.Tensor
    site: str = ""


@dataclass(frozen=True)
class InsertRotation:
    """Compute x @ Q at run time on the edge from `value` into `consumers` (an online rotation)."""

    value: ValueRef
    consumers: tuple[OpRef, ...]
    matrix: torch.Tensor
    site: str = ""
    hadamard_signs: torch.Tensor | None = (
        None  # set when matrix == diag(signs) @ hadamard(n): fast op allowed
    )


@dataclass(frozen=True)
class AddBias:
    """Add `delta` (one value per output channel) to a linear's output through its bias.

    A linear without a bias gets a zero one first (an Add after an ONNX MatMul, the bias
    argument of aten.linear): exact, and what OS+ needs to absorb a shift (b' = b + W z).
    """

    op: OpRef
    delta: torch.Tensor
    site: str = ""


@dataclass(frozen=True)
class KeepFloatChannels:
    """Annotate a linear: quantization keeps these input channels (sorted int64) in float.

    Changes nothing in the graph (the FP function is untouched); `plan_quantization` reads it
    through `GraphView.float_channels` and splits the layer into an integer part over the other
    channels plus a float part over these (LLM.int8 decomposition, `passes/decompose.py`).
    """

    op: OpRef
    channels: torch.Tensor
    site: str = ""


Edit = (
    ScaleChannels
    | ShiftChannels
    | RotateChannels
    | PermuteChannels
    | AddBias
    | InsertRotation
    | SplitOp
    | KeepFloatChannels
    | ExpandChannels
)
CONSTANT_EDITS = (
    ScaleChannels,
    ShiftChannels,
    RotateChannels,
    PermuteChannels,
)  # undone by restoring the constants


@dataclass
class SiteNote:
    """What a pass did, or why it skipped, at one site (named by the op or value it concerns)."""

    site: str
    applied: bool
    detail: str


@dataclass
class EditPlan:
    """The edits a pass wants, plus its per-site notes; applying it is the adapter's job."""

    pass_name: str
    edits: list[Edit] = field(default_factory=list)
    notes: list[SiteNote] = field(default_factory=list)

    @property
    def applied_sites(self) -> list[SiteNote]:
        return [n for n in self.notes if n.applied]

    @property
    def skipped_sites(self) -> list[SiteNote]:
        return [n for n in self.notes if not n.applied]

    def summary(self) -> str:
        skipped = self.skipped_sites
        text = f"{self.pass_name}: {len(self.applied_sites)} sites, {len(skipped)} skipped"
        if skipped:
            reasons: dict[str, int] = {}
            for n in skipped:
                reasons[n.detail] = reasons.get(n.detail, 0) + 1
            text += ": " + "; ".join(f"{r} (x{c})" for r, c in sorted(reasons.items(), key=lambda rc: -rc[1]))
        return text
