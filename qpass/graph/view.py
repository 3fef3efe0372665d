"""The backend-neutral graph contract that every pass reads, and the applying of its edits.

Passes never touch torch.fx or ONNX nodes: they see ops, values and constants (`refs`) through
`GraphView` and answer with an `EditPlan` (`edits`) that the adapter applies here.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from qpass.errors import PassError
from qpass.graph.edits import (
    AddBias,
    EditPlan,
    ExpandChannels,
    InsertRotation,
    KeepFloatChannels,
    PermuteChannels,
    RotateChannels,
    ScaleChannels,
    ShiftChannels,
    SplitOp,
)
from qpass.graph.refs import ALL_KINDS, ConstRef, NormParams, OpKind, OpRef, ResidualSum, ValueRef, WeightRef

Feeds = Mapping[str, Any]


class GraphView(abc.ABC):
    """What a pass may ask of a graph. Two adapters implement it: torch.fx and ONNX (onnx-ir)."""

    backend: str

    # structure
    @abc.abstractmethod
    def ops(self, kinds: frozenset[OpKind] = ALL_KINDS) -> Iterator[OpRef]:
        """Ops in topological order, filtered by kind."""

    def scope(self, op: OpRef) -> str:
        """Where the op came from, for name selectors: the module path on torch.fx, the node name on ONNX."""
        return op.name

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

    def residual_sum(self, op: OpRef) -> ResidualSum | None:
        """For a norm that normalises the sum of its inputs (a residual Add fused into it), what it
        adds and the sum it emits; None for a plain norm.
        """
        return None

    def attention_operands(self, op: OpRef) -> tuple[ValueRef | None, ValueRef | None, ValueRef | None]:
        """(q, k, v) activations of an ATTENTION op; None where an input is absent (ONNX Runtime's
        GroupQueryAttention given one packed q|k|v projection in its first input).
        """
        acts = self.value_operands(op)
        q, k, v = (*acts[:3], None, None, None)[:3]
        return q, k, v

    def writes_cache(self, op: OpRef) -> bool:
        """Whether the op also emits state beyond its first output (attention's present K/V): a
        factor on V would then reach that state, which the next step reads back.
        """
        return False

    def clip_bounds(self, op: OpRef) -> tuple[float, float] | None:
        """(lo, hi) of a ReLU / ReLU6 / Clip / hardtanh / clamp with constant scalar bounds, else None.

        Quantization reads it (a clamp right after a conv narrows the conv's output range exactly)
        and so does equalization (ReLU commutes with positive scales, a bounded clip does not).
        """
        return None

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


def iter_quantizable_ops(view: GraphView) -> Iterable[OpRef]:
    """LINEAR and CONV ops whose weight is a constant, in topological order (what quantize plans)."""
    for op in view.ops(frozenset({OpKind.LINEAR, OpKind.CONV})):
        if view.weight(op) is not None:
            yield op
