"""torch.fx adapter of `GraphView`: an unlifted torch.export GraphModule, read, run and edited in place.

With `fx_capture` (which produces the GraphModule) and lowering/torch_backend.py, the only code
that knows FX. Parameters are `get_attr` nodes of the unlifted module (`ExportedProgram.module()`);
constants are named by target.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

import qpass.math.hadamard_op  # noqa: F401 - defines torch.ops.qpass.hadamard_transform (online rotations)
from qpass.graph.edits import ExpandChannels, InsertRotation, SplitOp
from qpass.graph.fx_capture import Batch, split_batch
from qpass.graph.optable import aten_kind
from qpass.graph.refs import ALL_KINDS, ConstRef, NormParams, OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.view import GraphView


def _with_last_dim(val: torch.Tensor, width: int) -> torch.Tensor | None:
    """A fake tensor like `val` (same fake mode, same symbolic dims) with its last dimension `width`."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([val])
    try:
        if mode is None:
            return torch.empty((*val.shape[:-1], width), dtype=val.dtype, device="meta")
        with mode:
            return val.new_empty((*val.shape[:-1], width))
    except Exception:  # noqa: BLE001 - an unknown shape is better than a wrong one
        return None


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _packet(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def _is_full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * 4
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


def _static_dim(d: Any) -> int | str:
    """An int where the dim is static (SymInts that are really constants included), else its symbol."""
    if isinstance(d, int):
        return d
    const = d.node.maybe_as_int() if isinstance(d, torch.SymInt) else None
    return const if const is not None else str(d)


class _Recorder(torch.nn.Module):
    """Inserted temporarily after one node to capture its value during `observe`."""

    def __init__(self, store: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.store = store
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.store[self.key] = x.detach()
        return x


class FxGraphView(GraphView):
    """GraphView over an unlifted torch.export GraphModule (edited in place)."""

    backend = "fx"

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.dirty = False  # graph edited, code not regenerated yet (done once per plan)
        self.invalidate()

    # ------------------------------------------------------------------ indexing
    def invalidate(self) -> None:
        if self.dirty:
            self.gm.graph.lint()
            self.gm.recompile()
            self.dirty = False
        self._nodes = {n.name: n for n in self.gm.graph.nodes}
        self._kinds: dict[str, OpKind] = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_function":
                self._kinds[n.name] = self._classify(n)
            elif n.op == "call_module" and n.target != "_guards_fn":
                self._kinds[n.name] = OpKind.OTHER

    def _classify(self, node: fx.Node) -> OpKind:
        if node.meta.get("qpass_kind") == OpKind.ROTATION.value:
            return OpKind.ROTATION
        if _packet(node) == "slice" and _is_full_slice(node):
            return OpKind.CAST  # x[:, :] : an identity (indexing like x[:, :, None] exports as these)
        kind = aten_kind(_packet(node))
        if kind is OpKind.CONV and _packet(node) == "convolution" and len(node.args) > 6 and node.args[6]:
            return OpKind.CONV_TRANSPOSE  # aten.convolution(..., transposed=True, ...)
        if kind is OpKind.MATMUL and len(node.args) > 1 and self._is_const(node.args[1]):
            return OpKind.LINEAR
        return kind

    def _is_const(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg.op == "get_attr"

    def _const(self, node: fx.Node) -> ConstRef:
        return ConstRef(str(node.target), tuple(_attr(self.gm, str(node.target)).shape))

    def node(self, ref: OpRef | ValueRef) -> fx.Node:
        return self._nodes[ref.name]

    def _op(self, node: fx.Node) -> OpRef:
        return OpRef(node.name, self._kinds.get(node.name, OpKind.OTHER), _packet(node))

    # ------------------------------------------------------------------ structure
    def ops(self, kinds: frozenset[OpKind] = ALL_KINDS) -> Iterator[OpRef]:
        for n in list(self.gm.graph.nodes):
            kind = self._kinds.get(n.name)
            if kind is not None and kind in kinds:
                yield OpRef(n.name, kind, _packet(n))

    def op_inputs(self, op: OpRef) -> Sequence[ValueRef | ConstRef | None]:
        out: list[ValueRef | ConstRef | None] = []
        for arg in pytree.tree_leaves((self.node(op).args, self.node(op).kwargs)):
            if isinstance(arg, fx.Node):
                out.append(self._const(arg) if arg.op == "get_attr" else ValueRef(arg.name))
        return out

    def scope(self, op: OpRef) -> str:
        """The module the op was traced in (torch.export's `nn_module_stack`), e.g. `model.layers.0.mlp.down_proj`."""
        stack = self.node(op).meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else op.name

    def op_output(self, op: OpRef) -> ValueRef:
        return ValueRef(op.name)

    def producer(self, value: ValueRef) -> OpRef | None:
        node = self._nodes[value.name]
        return self._op(node) if node.name in self._kinds else None

    def consumers(self, value: ValueRef) -> Sequence[OpRef]:
        out = []
        for user in self._nodes[value.name].users:
            if user.op == "output":
                out.append(OpRef("<output>", OpKind.OTHER, "output"))
            elif not (user.op == "call_module" and user.target == "_guards_fn"):
                out.append(self._op(user))
        return out

    def is_graph_output(self, value: ValueRef) -> bool:
        return any(u.op == "output" for u in self._nodes[value.name].users)

    def shape(self, value: ValueRef) -> tuple[int | str | None, ...] | None:
        val = self._nodes[value.name].meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(_static_dim(d) for d in val.shape)
        return None

    # ------------------------------------------------------------------ parameters
    def linear_input(self, op: OpRef) -> ValueRef:
        arg = self.node(op).args[0]
        return ValueRef(arg.name)

    def weight(self, op: OpRef) -> WeightRef | None:
        node = self.node(op)
        if (
            op.kind not in (OpKind.LINEAR, OpKind.CONV)
            or len(node.args) < 2
            or not self._is_const(node.args[1])
        ):
            return None
        const = self._const(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = self._const(bias_arg) if self._is_const(bias_arg) else None
        if op.kind is OpKind.LINEAR and op.op_type in ("matmul", "mm"):
            return WeightRef(const, in_axis=0, out_axis=1, bias=None)  # x @ W with W [in, out]
        return WeightRef(const, in_axis=1, out_axis=0, bias=bias)

    def norm_params(self, op: OpRef) -> NormParams | None:
        node = self.node(op)
        if op.kind is OpKind.LAYER_NORM and op.op_type == "layer_norm":
            normalized = node.args[1]
            if len(normalized) != 1:
                return None
            gamma = node.args[2] if len(node.args) > 2 else None
            beta = node.args[3] if len(node.args) > 3 else None
        elif op.kind is OpKind.RMS_NORM:
            if len(node.args[1]) != 1:
                return None
            gamma = node.args[2] if len(node.args) > 2 else None
            beta = None
        else:
            return None
        return NormParams(
            self._const(gamma) if self._is_const(gamma) else None,
            self._const(beta) if self._is_const(beta) else None,
        )

    def _same_tensor_nodes(self, const: ConstRef) -> list[fx.Node]:
        target = _attr(self.gm, const.name)
        return [
            n for n in self.gm.graph.nodes if n.op == "get_attr" and _attr(self.gm, str(n.target)) is target
        ]

    def clip_bounds(self, op: OpRef) -> tuple[float, float] | None:
        node, inf = self.node(op), float("inf")
        if op.op_type == "relu":
            return 0.0, inf
        defaults = {"hardtanh": (-1.0, 1.0), "clamp": (None, None), "relu6": (0.0, 6.0)}.get(op.op_type)
        if defaults is None:
            return None
        given = list(node.args[1:3]) + [None] * 2
        lo = node.kwargs.get("min", node.kwargs.get("min_val", given[0] if len(node.args) > 1 else defaults[0]))
        hi = node.kwargs.get("max", node.kwargs.get("max_val", given[1] if len(node.args) > 2 else defaults[1]))
        if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
            return None  # tensor bounds
        return (-inf if lo is None else float(lo)), (inf if hi is None else float(hi))

    def const_users(self, const: ConstRef) -> int:
        return sum(len(n.users) for n in self._same_tensor_nodes(const))

    def read(self, const: ConstRef) -> torch.Tensor:
        return _attr(self.gm, const.name).detach().clone()

    def write(self, const: ConstRef, value: torch.Tensor) -> None:
        tensor = _attr(self.gm, const.name)
        if tuple(value.shape) != tuple(tensor.shape):
            msg = f"write to constant '{const.name}': shape {tuple(value.shape)} != {tuple(tensor.shape)}"
            raise ValueError(msg)
        with torch.no_grad():
            tensor.copy_(value.to(tensor.dtype))

    # ------------------------------------------------------------------ execution
    def run(self, feeds: Batch) -> list[torch.Tensor]:
        if self.dirty:
            self.invalidate()
        args, kwargs = split_batch(feeds)
        with torch.no_grad():
            out = self.gm(*args, **kwargs)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def observe(self, values: Sequence[ValueRef], feeds: Batch) -> dict[str, torch.Tensor]:
        (observed,) = self.observe_stream(values, [feeds])  # runs the stream to its end: probes removed
        return observed

    def observe_stream(
        self, values: Sequence[ValueRef], batches: Iterable[Batch]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Insert one recorder after each value, run every batch, then remove the recorders."""
        store: dict[str, torch.Tensor] = {}
        graph = self.gm.graph
        inserted: list[tuple[fx.Node, str]] = []
        try:
            for i, value in enumerate(dict.fromkeys(values)):
                name = f"_qpass_recorder_{i}"
                self.gm.add_module(name, _Recorder(store, value.name))
                with graph.inserting_after(self._nodes[value.name]):
                    inserted.append((graph.call_module(name, (self._nodes[value.name],)), name))
            self.gm.recompile()
            for batch in batches:
                store.clear()
                args, kwargs = split_batch(batch)
                with torch.no_grad():
                    self.gm(*args, **kwargs)
                yield dict(store)
        finally:
            for node, name in inserted:
                graph.erase_node(node)
                delattr(self.gm, name)
            self.gm.recompile()

    # ------------------------------------------------------------------ rewriting
    def insert_rotation(self, edit: InsertRotation) -> None:
        graph, src = self.gm.graph, self._nodes[edit.value.name]
        val = src.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        i = 0
        while hasattr(self.gm, f"_qpass_rotation_{i}"):
            i += 1
        name = f"_qpass_rotation_{i}"
        fast = edit.hadamard_signs is not None  # O(n log n) transform instead of a dense matmul
        const = edit.hadamard_signs if fast else edit.matrix
        self.gm.register_buffer(name, const.to(dtype).contiguous())
        with graph.inserting_after(src):
            attr = graph.get_attr(name)
        with graph.inserting_after(attr):
            if fast:
                rot = graph.call_function(torch.ops.qpass.hadamard_transform.default, (src, attr))
            else:
                rot = graph.call_function(torch.ops.aten.matmul.default, (src, attr))
        rot.meta.update({"qpass_kind": OpKind.ROTATION.value, "val": val})
        for consumer in edit.consumers:
            self._nodes[consumer.name].replace_input_with(src, rot)
        self.dirty = True

    def create_bias(self, op: OpRef) -> ConstRef:
        node, ref = self.node(op), self.weight(op)
        graph = self.gm.graph
        i = 0
        while hasattr(self.gm, f"_qpass_bias_{i}"):
            i += 1
        name = f"_qpass_bias_{i}"
        weight = _attr(self.gm, ref.const.name)
        self.gm.register_parameter(
            name, torch.nn.Parameter(torch.zeros(ref.out_features, dtype=weight.dtype), requires_grad=False)
        )
        if op.op_type in ("matmul", "mm"):  # x @ W: the bias is an add after the product
            with graph.inserting_after(node):
                attr = graph.get_attr(name)
            with graph.inserting_after(attr):
                add = graph.call_function(torch.ops.aten.add.Tensor, (node, attr))
            node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
            add.meta.update({"val": node.meta.get("val")})
        else:  # aten.linear(x, W) -> aten.linear(x, W, b)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            node.args = (*node.args[:2], attr, *node.args[3:])  # conv: stride, padding, ... stay
        self.dirty = True
        self.invalidate()
        return ConstRef(name, (ref.out_features,))

    def expand_channels(self, edit: ExpandChannels) -> None:
        """Swap the attribute for the rebuilt tensor; record the new width in the values' meta."""
        new = self._expanded(edit)
        owner: Any = self.gm
        *path, leaf = edit.const.name.split(".")
        for part in path:
            owner = getattr(owner, part)
        old = getattr(owner, leaf)
        if isinstance(old, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(owner, leaf, new)  # a buffer or plain tensor attribute: replaced in place
        width = new.shape[edit.axis % new.dim()]
        for value in edit.values:
            node = self._nodes[value.name]
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                node.meta["val"] = _with_last_dim(val, width)
        self.dirty = True

    def split_op(self, edit: SplitOp) -> None:
        """linear(x, cat(W_i), cat(b_i)) -> unflatten(-1, [k, out]) -> sum(-2), replacing the linear."""
        graph, node = self.gm.graph, self._nodes[edit.op.name]
        k, out = len(edit.weights), edit.weights[0].shape[0]
        old = [a for a in node.args[1:] if self._is_const(a)]
        dtype = _attr(self.gm, str(old[0].target)).dtype
        i = 0
        while hasattr(self.gm, f"_qpass_split_{i}_weight"):
            i += 1
        self.gm.register_buffer(f"_qpass_split_{i}_weight", torch.cat(edit.weights).to(dtype).contiguous())
        has_bias = any(b is not None for b in edit.biases)
        if has_bias:
            biases = [torch.zeros(out) if b is None else b for b in edit.biases]
            self.gm.register_buffer(f"_qpass_split_{i}_bias", torch.cat(biases).to(dtype).contiguous())
        with graph.inserting_before(node):
            w = graph.get_attr(f"_qpass_split_{i}_weight")
            b = graph.get_attr(f"_qpass_split_{i}_bias") if has_bias else None
            lin = graph.call_function(torch.ops.aten.linear.default, (node.args[0], w, b))
            parts = graph.call_function(torch.ops.aten.unflatten.int, (lin, -1, [k, out]))
            total = graph.call_function(torch.ops.aten.sum.dim_IntList, (parts, [-2]))
        total.meta = dict(node.meta)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        for attr in old:
            if not attr.users:
                graph.erase_node(attr)
        self.dirty = True
