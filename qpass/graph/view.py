"""The backend-neutral graph view that every pass reads, and the edits it may return.

Passes never touch torch.fx or ONNX nodes: they see ops, values and constants through
`GraphView` and answer with an `EditPlan` (plain data) that the adapter applies.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qpass.errors import PassError


class OpKind(enum.Enum):
    """What an op is, as far as the passes care."""

    LINEAR = "linear"  # y = x @ W^T (+ b) with a constant W: Linear, MatMul(x, W), Gemm
    CONV = "conv"
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    MUL = "mul"
    ADD = "add"
    SUB = "sub"
    DIV = "div"
    MATMUL = "matmul"  # two activations (attention scores, probs @ V)
    ATTENTION = "attention"  # fused scaled-dot-product attention
    ACTIVATION = "activation"  # gelu, silu, relu, tanh, ...
    SOFTMAX = "softmax"
    RESHAPE = "reshape"  # view, reshape, flatten, unsqueeze, squeeze
    TRANSPOSE = "transpose"  # transpose, permute
    EXPAND = "expand"  # expand, repeat (GQA key/value replication)
    CAST = "cast"  # dtype casts, clone, contiguous, dropout in eval: identities for the math
    SHAPE_OF = "shape_of"  # reads only the shape (ONNX Shape/Size, aten.sym_size)
    ROTATION = "rotation"  # an online rotation qpass inserted (x @ Q): never quantized as a layer
    OTHER = "other"


ALL_KINDS = frozenset(OpKind)


@dataclass(frozen=True)
class ValueRef:
    """An activation edge: the output of an op or a graph input."""

    name: str


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor (weight, bias, norm gamma/beta, a multiplier) stored in the graph."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OpRef:
    """One op. `op_type` is the backend's own name (aten target or ONNX op type), for messages."""

    name: str
    kind: OpKind
    op_type: str


@dataclass(frozen=True)
class WeightRef:
    """The constant weight of a linear/conv op with its canonical axes (Gemm transB, MatMul side hidden)."""

    const: ConstRef
    in_axis: int
    out_axis: int
    bias: ConstRef | None = None

    @property
    def in_features(self) -> int:
        return self.const.shape[self.in_axis]

    @property
    def out_features(self) -> int:
        return self.const.shape[self.out_axis]


@dataclass(frozen=True)
class NormParams:
    """The per-channel affine parameters of a normalisation op (gamma, beta), channel axis last."""

    gamma: ConstRef | None
    beta: ConstRef | None


# ----------------------------------------------------------------------------- edits
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


# ----------------------------------------------------------------------------- the view
Feeds = Mapping[str, Any]


class GraphView(abc.ABC):
    """What a pass may ask of a graph. Two adapters implement it: torch.fx and ONNX (onnx-ir)."""

    backend: str

    # structure
    @abc.abstractmethod
    def ops(self, kinds: frozenset[OpKind] = ALL_KINDS) -> Iterator[OpRef]:
        """Ops in topological order, filtered by kind."""

    @abc.abstractmethod
    def op_inputs(self, op: OpRef) -> Sequence[ValueRef | ConstRef | None]:
        """The op's tensor operands in order: activations as ValueRef, constants as ConstRef."""

    @abc.abstractmethod
    def op_output(self, op: OpRef) -> ValueRef:
        """The op's (first) output value."""

    @abc.abstractmethod
    def producer(self, value: ValueRef) -> OpRef | None:
        """The op that computes `value`, or None for a graph input."""

    @abc.abstractmethod
    def consumers(self, value: ValueRef) -> Sequence[OpRef]:
        """Every op that reads `value`; a graph output counts as a consumer named '<output>'."""

    @abc.abstractmethod
    def is_graph_output(self, value: ValueRef) -> bool:
        """Whether `value` leaves the graph."""

    @abc.abstractmethod
    def shape(self, value: ValueRef) -> tuple[int | str | None, ...] | None:
        """Static shape where known (symbolic dims as str/None)."""

    # linear layers and per-channel parameters
    @abc.abstractmethod
    def linear_input(self, op: OpRef) -> ValueRef:
        """The activation operand of a LINEAR/CONV op."""

    @abc.abstractmethod
    def weight(self, op: OpRef) -> WeightRef | None:
        """The constant weight of a LINEAR/CONV op, or None when it is not constant."""

    @abc.abstractmethod
    def norm_params(self, op: OpRef) -> NormParams | None:
        """Gamma/beta of a LAYER_NORM/RMS_NORM op (normalised over the last axis only)."""

    @abc.abstractmethod
    def const_users(self, const: ConstRef) -> int:
        """How many ops read this constant (a shared constant cannot be rescaled for one of them)."""

    @abc.abstractmethod
    def read(self, const: ConstRef) -> torch.Tensor:
        """A copy of the constant as a float32-or-native torch tensor."""

    @abc.abstractmethod
    def write(self, const: ConstRef, value: torch.Tensor) -> None:
        """Replace the constant's contents (same shape)."""

    # execution
    @abc.abstractmethod
    def run(self, feeds: Feeds) -> list[torch.Tensor]:
        """Run the graph on one batch; return its outputs flattened, as tensors."""

    @abc.abstractmethod
    def observe(self, values: Sequence[ValueRef], feeds: Feeds) -> dict[str, torch.Tensor]:
        """Run one batch and return the named intermediate values."""

    def observe_stream(
        self, values: Sequence[ValueRef], batches: Iterable[Any]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`observe` over many batches; adapters may set up their probes once for the whole stream."""
        for batch in batches:
            yield self.observe(values, batch)

    # rewriting
    @abc.abstractmethod
    def insert_rotation(self, edit: InsertRotation) -> None:
        """Insert an op computing `value @ matrix` that feeds `consumers` instead of `value`."""

    def expand_channels(self, edit: ExpandChannels) -> None:
        """Rebuild a constant with a new channel count (see `ExpandChannels`); adapters that can, override this."""
        msg = f"{self.backend} graphs cannot change the channel count of '{edit.const.name}'"
        raise PassError(msg)

    def _expanded(self, edit: ExpandChannels) -> torch.Tensor:
        tensor = self.read(edit.const)
        axis = edit.axis % tensor.dim()
        index = edit.index.to(torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= tensor.shape[axis]):
            msg = f"ExpandChannels on constant '{edit.const.name}' axis {axis}: index out of range"
            raise PassError(msg)
        out = tensor.index_select(axis, index)
        if edit.scale is not None:
            view = [1] * tensor.dim()
            view[axis] = -1
            out = (out.to(torch.float64) * edit.scale.to(torch.float64).reshape(view)).to(tensor.dtype)
        return out.contiguous()

    def split_op(self, edit: SplitOp) -> None:
        """Replace a linear by summed parts (see `SplitOp`); adapters that can, override this."""
        msg = f"{self.backend} graphs cannot split op '{edit.op.name}' yet"
        raise PassError(msg)

    @abc.abstractmethod
    def create_bias(self, op: OpRef) -> ConstRef:
        """Give a bias-free linear a zero bias constant (same dtype as its weight); return it."""

    def apply(self, plan: EditPlan) -> bool:
        """Apply every edit of the plan; return whether the graph changed."""
        state = self.__dict__
        if any(not isinstance(e, KeepFloatChannels) for e in plan.edits):
            state["_graph_edits"] = state.get("_graph_edits", 0) + 1  # stamps KeepFloatChannels
        for edit in plan.edits:
            if isinstance(edit, KeepFloatChannels):
                state.setdefault("_float_channels", {})[edit.op.name] = (
                    edit.channels,
                    state.get("_graph_edits", 0),
                )
            elif isinstance(edit, ScaleChannels):
                self._scale(edit)
            elif isinstance(edit, ShiftChannels):
                tensor = self.read(edit.const)
                self.write(edit.const, tensor + edit.delta.to(tensor.dtype))
            elif isinstance(edit, RotateChannels):
                self._rotate(edit)
            elif isinstance(edit, AddBias):
                self._add_bias(edit)
            elif isinstance(edit, InsertRotation):
                self.insert_rotation(edit)
            elif isinstance(edit, PermuteChannels):
                self._permute(edit)
            elif isinstance(edit, SplitOp):
                self.split_op(edit)
            elif isinstance(edit, ExpandChannels):
                self.expand_channels(edit)
            else:  # pragma: no cover - the edit set is closed
                msg = f"unknown edit {type(edit).__name__} in plan of {plan.pass_name}"
                raise TypeError(msg)
        self.invalidate()
        return bool(plan.edits)

    def _scale(self, edit: ScaleChannels) -> None:
        tensor = self.read(edit.const)
        axis = edit.axis % tensor.dim()
        view = [1] * tensor.dim()
        view[axis] = -1
        self.write(edit.const, tensor * edit.factors.to(torch.float64).reshape(view).to(tensor.dtype))

    def _add_bias(self, edit: AddBias) -> None:
        ref = self.weight(edit.op)
        if ref is None:
            msg = f"AddBias: '{edit.op.name}' is not a linear with a constant weight"
            raise ValueError(msg)
        bias = ref.bias if ref.bias is not None else self.create_bias(edit.op)
        tensor = self.read(bias)
        self.write(bias, tensor + edit.delta.reshape(tensor.shape).to(tensor.dtype))

    def _rotate(self, edit: RotateChannels) -> None:
        tensor = self.read(edit.const)
        axis = edit.axis % tensor.dim()
        moved = tensor.to(torch.float64).movedim(axis, -1) @ edit.matrix.to(torch.float64)
        self.write(edit.const, moved.movedim(-1, axis).to(tensor.dtype))

    def _permute(self, edit: PermuteChannels) -> None:
        tensor = self.read(edit.const)
        axis = edit.axis % tensor.dim()
        perm = edit.perm.to(torch.long)
        if sorted(perm.tolist()) != list(range(tensor.shape[axis])):
            width = tensor.shape[axis]
            msg = f"PermuteChannels on constant '{edit.const.name}' axis {axis}: not a permutation of {width}"
            raise PassError(msg)
        self.write(edit.const, tensor.index_select(axis, perm))

    def float_channels(self, op: OpRef) -> torch.Tensor | None:
        """The input channels a `KeepFloatChannels` annotation keeps in float for `op` (None: none).

        Raises when a later plan edited the graph: channel indices recorded before a permutation,
        rotation or split would no longer name the same channels.
        """
        channels, stamp = self.__dict__.get("_float_channels", {}).get(op.name, (None, 0))
        if channels is not None and stamp != self.__dict__.get("_graph_edits", 0):
            msg = (
                f"float channels chosen for '{op.name}' are stale: a pass edited the graph after "
                "int8_decompose; int8_decompose must be the last pass"
            )
            raise PassError(msg)
        return channels

    def invalidate(self) -> None:  # noqa: B027 - optional hook, most adapters keep no cache
        """Drop caches after the graph changed."""

    # convenience shared by passes
    def ops_of(self, *kinds: OpKind) -> list[OpRef]:
        return list(self.ops(frozenset(kinds)))

    def constant_operand(self, op: OpRef) -> tuple[ConstRef, ValueRef] | None:
        """For a binary op with one constant and one activation operand: (constant, activation)."""
        ins = self.op_inputs(op)
        consts = [i for i in ins if isinstance(i, ConstRef)]
        acts = [i for i in ins if isinstance(i, ValueRef)]
        if len(consts) == 1 and len(acts) == 1:
            return consts[0], acts[0]
        return None

    def value_operands(self, op: OpRef) -> list[ValueRef]:
        return [i for i in self.op_inputs(op) if isinstance(i, ValueRef)]


def iter_linear_ops(view: GraphView) -> Iterable[OpRef]:
    """LINEAR ops whose weight is a constant (the quantizable layers)."""
    for op in view.ops(frozenset({OpKind.LINEAR})):
        if view.weight(op) is not None:
            yield op
