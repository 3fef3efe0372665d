"""ONNX adapter of `GraphView` over an onnx-ir model (edited in place).

With `onnx_load` (reading models), `onnx_run` (ONNX Runtime) and lowering/onnxruntime.py, the
only code that knows ONNX. Constants are initializers (Constant nodes are lifted to initializers
when the view is built); values and nodes get unique names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from qpass.errors import PassError
from qpass.graph.edits import ExpandChannels, InsertRotation, SplitOp
from qpass.graph.onnx_contrib import attention_qkv, norm_param_values, residual_sum_values, writes_state
from qpass.graph.onnx_load import lift_constants
from qpass.graph.onnx_run import is_lazy, ort_session, run_session
from qpass.graph.onnx_shapes import infer_missing_shapes
from qpass.graph.optable import onnx_kind
from qpass.graph.refs import ALL_KINDS, ConstRef, NormParams, OpKind, OpRef, ResidualSum, ValueRef, WeightRef
from qpass.graph.view import GraphView

KIND_KEY = "qpass.kind"  # node metadata marking ops qpass inserted (kept in the saved model)


class OnnxGraphView(GraphView):
    """GraphView over an onnx-ir Model (edited in place); runs through onnxruntime."""

    backend = "onnx"

    def __init__(self, model: ir.Model, origin: str = "<ONNX model>") -> None:
        self.model = model
        self.origin = origin  # the file (or a description) named in errors
        self.graph = model.graph
        lift_constants(self.graph)
        self._name_everything()
        self.inferred = infer_missing_shapes(model)  # shapes the file lacks (`forget_inferred_shapes`)
        self._session_cache: dict[tuple[str, ...], Any] = {}
        self.lowered_inputs: dict[str, ir.Value] = {}  # activation -> its shared Q/DQ output
        self.invalidate()

    def _name_everything(self) -> None:
        seen: set[str] = set()
        for i, node in enumerate(self.graph):
            if not node.name or node.name in seen:
                node.name = f"{node.op_type}_{i}"
            seen.add(node.name)
            for j, out in enumerate(node.outputs):
                if not out.name:
                    out.name = f"{node.name}_out{j}"

    # ------------------------------------------------------------------ indexing
    def invalidate(self) -> None:
        self._nodes = {n.name: n for n in self.graph}
        self._values: dict[str, ir.Value] = {v.name: v for v in self.graph.inputs}
        self._values.update(self.graph.initializers)
        for n in self.graph:
            for out in n.outputs:
                self._values[out.name] = out
        self._kinds = {n.name: self._classify(n) for n in self.graph}
        self._taken_names = set(self._values) | set(self._nodes)
        self._session_cache = {}

    def _classify(self, node: ir.Node) -> OpKind:
        if node.metadata_props.get(KIND_KEY) == OpKind.ROTATION.value:
            return OpKind.ROTATION
        kind = onnx_kind(node.op_type, node.domain)
        if kind is OpKind.MATMUL and len(node.inputs) == 2:
            b = node.inputs[1]
            if b is not None and self._is_const(b) and len(b.shape or ()) == 2:
                return OpKind.LINEAR
        if kind is OpKind.LINEAR and node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0) or not self._is_const(node.inputs[1]):
                return OpKind.MATMUL
        return kind

    @staticmethod
    def _is_const(value: ir.Value | None) -> bool:
        return value is not None and value.is_initializer() and value.const_value is not None

    def _const(self, value: ir.Value) -> ConstRef:
        return ConstRef(value.name, tuple(value.const_value.shape.numpy()))

    def fresh_name(self, base: str) -> str:
        """A value/node name not used anywhere in the graph yet."""
        taken = self._taken_names
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def node(self, ref: OpRef | ValueRef) -> ir.Node:
        return self._nodes[ref.name]

    def value(self, ref: ValueRef | ConstRef) -> ir.Value:
        return self._values[ref.name]

    def _op(self, node: ir.Node) -> OpRef:
        return OpRef(node.name, self._kinds.get(node.name, OpKind.OTHER), node.op_type)

    # ------------------------------------------------------------------ structure
    def ops(self, kinds: frozenset[OpKind] = ALL_KINDS) -> Iterator[OpRef]:
        for node in list(self.graph):
            kind = self._kinds.get(node.name, OpKind.OTHER)
            if kind in kinds:
                yield OpRef(node.name, kind, node.op_type)

    def op_inputs(self, op: OpRef) -> Sequence[ValueRef | ConstRef | None]:
        out: list[ValueRef | ConstRef | None] = []
        for v in self.node(op).inputs:
            if v is None:
                out.append(None)
            elif self._is_const(v):
                out.append(self._const(v))
            else:
                out.append(ValueRef(v.name))
        return out

    def op_output(self, op: OpRef) -> ValueRef:
        return ValueRef(self.node(op).outputs[0].name)

    def producer(self, value: ValueRef) -> OpRef | None:
        """A later output (a Skip norm's residual sum, attention's present) has kind OTHER: not the kind's."""
        v = self._values[value.name]
        node = v.producer()
        if node is not None and v.index():
            return OpRef(node.name, OpKind.OTHER, f"{node.op_type}[output {v.index()}]")
        return self._op(node) if node is not None else None

    def consumers(self, value: ValueRef) -> Sequence[OpRef]:
        v = self._values[value.name]
        out = [self._op(use.node) for use in v.uses()]
        if v.is_graph_output():
            out.append(OpRef("<output>", OpKind.OTHER, "output"))
        return out

    def is_graph_output(self, value: ValueRef) -> bool:
        return self._values[value.name].is_graph_output()

    def shape(self, value: ValueRef) -> tuple[int | str | None, ...] | None:
        shape = self._values[value.name].shape
        if shape is None:
            return None
        return tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in shape)

    # ------------------------------------------------------------------ parameters
    def linear_input(self, op: OpRef) -> ValueRef:
        return ValueRef(self.node(op).inputs[0].name)

    def weight(self, op: OpRef) -> WeightRef | None:
        if op.kind not in (OpKind.LINEAR, OpKind.CONV):
            return None
        node = self.node(op)
        w = node.inputs[1]
        if not self._is_const(w):
            return None
        const = self._const(w)
        if op.op_type == "MatMul":
            return WeightRef(const, in_axis=0, out_axis=1, bias=self._following_bias(node, const.shape[1]))
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        bias = self._const(bias_v) if self._is_const(bias_v) and len(bias_v.const_value.shape) == 1 else None
        if op.op_type == "Gemm":
            if node.attributes.get_int("transB", 0):
                return WeightRef(const, in_axis=1, out_axis=0, bias=bias)
            return WeightRef(const, in_axis=0, out_axis=1, bias=bias)
        return WeightRef(const, in_axis=1, out_axis=0, bias=bias)  # Conv [out, in/groups, k...]

    def _following_bias(self, node: ir.Node, width: int) -> ConstRef | None:
        """MatMul(x, W) -> Add(., b) as exported for nn.Linear: b is the layer's bias."""
        uses = node.outputs[0].uses()
        if len(uses) != 1 or node.outputs[0].is_graph_output():
            return None
        add = uses[0].node
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        other = add.inputs[1 - uses[0].idx]
        if self._is_const(other) and tuple(other.const_value.shape) == (width,):
            return self._const(other)
        return None

    def norm_params(self, op: OpRef) -> NormParams | None:
        if op.kind not in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
            return None
        node = self.node(op)
        axis = node.attributes.get_int("axis", -1)
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None  # normalised over more than the channel axis
        gamma, beta = norm_param_values(node, op.kind is OpKind.LAYER_NORM)
        return NormParams(
            self._const(gamma) if self._is_const(gamma) else None,
            self._const(beta) if self._is_const(beta) else None,
        )

    def residual_sum(self, op: OpRef) -> ResidualSum | None:
        found = residual_sum_values(self.node(op))
        if found is None or not all(v is not None and not self._is_const(v) for v in found[0]):
            return None
        bias = self._const(found[1]) if self._is_const(found[1]) else None
        return ResidualSum(tuple(ValueRef(v.name) for v in found[0]), bias, found[2] and ValueRef(found[2].name))

    def attention_operands(self, op: OpRef) -> tuple[ValueRef | None, ValueRef | None, ValueRef | None]:
        refs = [None if x is None or self._is_const(x) else ValueRef(x.name) for x in attention_qkv(self.node(op))]
        return refs[0], refs[1], refs[2]

    def writes_cache(self, op: OpRef) -> bool:
        return writes_state(self.node(op))

    def clip_bounds(self, op: OpRef) -> tuple[float, float] | None:
        if op.op_type == "Relu":
            return 0.0, float("inf")
        if op.op_type != "Clip":
            return None
        node, bounds = self.node(op), [float("-inf"), float("inf")]
        for i in (1, 2):
            value = node.inputs[i] if len(node.inputs) > i else None
            if value is None:
                continue
            if not self._is_const(value) or value.const_value.numpy().size != 1:
                return None
            bounds[i - 1] = float(value.const_value.numpy().reshape(()))
        return bounds[0], bounds[1]

    def const_users(self, const: ConstRef) -> int:
        return len(self._values[const.name].uses())

    def read(self, const: ConstRef) -> torch.Tensor:
        tensor = self._values[const.name].const_value
        out = torch.from_numpy(np.array(tensor.numpy(), copy=True))
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()  # unmap: a big model's weights are not all kept resident at once
        return out

    def write(self, const: ConstRef, value: torch.Tensor) -> None:
        v = self._values[const.name]
        old = v.const_value.numpy()
        if tuple(value.shape) != tuple(old.shape):
            msg = f"write to initializer '{const.name}': shape {tuple(value.shape)} != {tuple(old.shape)}"
            raise ValueError(msg)
        v.const_value = ir.tensor(value.detach().cpu().numpy().astype(old.dtype), name=v.name)
        self._session_cache = {}

    def forget_inferred_shapes(self) -> None:
        """Before the model leaves qpass: back to the file's own value shapes (inferred ones are unchecked)."""
        self.inferred.forget(self.graph)

    # ------------------------------------------------------------------ execution
    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def _session(self, extra_outputs: tuple[str, ...] = ()) -> Any:
        sess = self._session_cache.get(extra_outputs)
        if sess is None:
            if is_lazy(self.graph):
                self._session_cache.clear()  # one ORT copy of a big model at a time
            sess = ort_session(self.model, self._values, extra_outputs, self.origin)
            self._session_cache[extra_outputs] = sess
        return sess

    def run(self, feeds: Mapping[str, Any]) -> list[torch.Tensor]:
        outs = run_session(self._session(), None, feeds, self.origin)
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def observe(self, values: Sequence[ValueRef], feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        names = tuple(dict.fromkeys(v.name for v in values))
        sess = self._session(names)
        outs = run_session(sess, list(names), feeds, self.origin)
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outs, strict=True)}

    # ------------------------------------------------------------------ rewriting
    def add_initializer(self, base_name: str, array: np.ndarray) -> ir.Value:
        """A new initializer under a fresh name derived from `base_name`."""
        name = self.fresh_name(base_name)
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
        )
        value.const_value = ir.tensor(array, name=name)
        self.graph.register_initializer(value)
        return value

    def insert_rotation(self, edit: InsertRotation) -> None:
        x = self._values[edit.value.name]
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        matrix = edit.matrix.detach().cpu().numpy().astype(dtype)
        q = self.add_initializer(f"{x.name}_rotation", matrix)
        node = ir.node("MatMul", [x, q], name=self.fresh_name(f"{x.name}_rotate"))
        node.metadata_props[KIND_KEY] = OpKind.ROTATION.value
        out = node.outputs[0]
        out.name, out.shape, out.type = self.fresh_name(f"{x.name}_rotated"), x.shape, x.type
        producer = x.producer()
        if producer is not None:
            self.graph.insert_after(producer, node)
        else:
            self.graph.insert_before(self.graph.node(0), node)
        for consumer in edit.consumers:
            cnode = self._nodes[consumer.name]
            for i, inp in enumerate(cnode.inputs):
                if inp is x:
                    cnode.replace_input_with(i, out)

    def create_bias(self, op: OpRef) -> ConstRef:
        """MatMul/Gemm(x, W) -> Add(., 0): the form `weight()` reads as the layer's bias."""
        node, ref = self._nodes[op.name], self.weight(op)
        out = node.outputs[0]
        dtype = self._values[ref.const.name].const_value.numpy().dtype
        b = self.add_initializer(f"{op.name}_bias", np.zeros(ref.out_features, dtype=dtype))
        if op.kind is OpKind.CONV:  # Conv(x, W) -> Conv(x, W, B): the bias is its third input
            node.resize_inputs(3)
            node.replace_input_with(2, b)
            self.invalidate()
            return self._const(b)
        add = ir.node("Add", [out, b], name=self.fresh_name(f"{op.name}_bias_add"))
        new_out = add.outputs[0]
        new_out.name, new_out.shape, new_out.type = self.fresh_name(f"{out.name}_biased"), out.shape, out.type
        self.graph.insert_after(node, add)
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, new_out)
        if out.is_graph_output():
            outputs = self.graph.outputs
            outputs[outputs.index(out)] = new_out
            new_out.name, out.name = out.name, new_out.name
        self.invalidate()
        return self._const(b)

    def expand_channels(self, edit: ExpandChannels) -> None:
        """Replace the initializer by the rebuilt tensor; the values' last dimension follows."""
        new = self._expanded(edit)
        v = self._values[edit.const.name]
        dtype = v.const_value.numpy().dtype
        v.const_value = ir.tensor(new.detach().cpu().numpy().astype(dtype), name=v.name)
        v.shape = ir.Shape(list(new.shape))
        width = new.shape[edit.axis % new.dim()]
        for value in edit.values:
            val = self._values[value.name]
            if val.shape is not None and len(val.shape):
                val.shape = ir.Shape([*list(val.shape)[:-1], width])
        self._session_cache = {}

    def split_op(self, edit: SplitOp) -> None:
        """MatMul(x, cat(W_i)^T) [+ Add cat(b_i)] -> Reshape [..., k, out] -> ReduceSum(axis -2).

        Replaces the linear together with its bias (a following Add for MatMul).
        """
        node = self._nodes[edit.op.name]
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            msg = f"node '{node.name}': split needs the rank of its input '{x.name}'"
            raise PassError(msg)
        ref = self.weight(edit.op)
        tail = node
        if node.op_type == "MatMul" and ref is not None and ref.bias is not None:
            tail = node.outputs[0].uses()[0].node  # the Add of the bias
        k, out = len(edit.weights), edit.weights[0].shape[0]
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        w = self.add_initializer(f"{node.name}_split_weight", torch.cat(edit.weights).T.numpy().astype(dtype))
        new_nodes = [ir.node("MatMul", [x, w], name=self.fresh_name(f"{node.name}_split"))]
        y = new_nodes[-1].outputs[0]
        if any(b is not None for b in edit.biases):
            bias = torch.cat([torch.zeros(out) if b is None else b for b in edit.biases])
            b = self.add_initializer(f"{node.name}_split_bias", bias.numpy().astype(dtype))
            new_nodes.append(ir.node("Add", [y, b], name=self.fresh_name(f"{node.name}_split_bias_add")))
        shape = self.add_initializer(
            f"{node.name}_split_shape", np.array([0] * (rank - 1) + [k, out], dtype=np.int64)
        )
        new_nodes.append(
            ir.node("Reshape", [new_nodes[-1].outputs[0], shape], name=self.fresh_name(f"{node.name}_parts"))
        )
        axes = self.add_initializer(f"{node.name}_split_axes", np.array([-2], dtype=np.int64))
        new_nodes.append(
            ir.node(
                "ReduceSum",
                [new_nodes[-1].outputs[0], axes],
                {"keepdims": 0},
                name=self.fresh_name(f"{node.name}_sum"),
            )
        )
        for n in new_nodes:
            for o in n.outputs:
                o.name = self.fresh_name(f"{n.name}_out")
        final, old_out = new_nodes[-1].outputs[0], tail.outputs[0]
        final.shape, final.type = old_out.shape, old_out.type
        self.graph.insert_before(node, new_nodes)
        was_output = old_out.is_graph_output()
        old_out.replace_all_uses_with(final, replace_graph_outputs=True)
        if was_output:
            final.name, old_out.name = old_out.name, self.fresh_name(f"{old_out.name}_unsplit")
        old_consts = [v for v in (*node.inputs[1:], *tail.inputs[1:]) if self._is_const(v)]
        self.graph.remove([tail, node] if tail is not node else [node], safe=True)
        for v in old_consts:
            if not v.uses() and v.name in self.graph.initializers:
                self.graph.initializers.pop(v.name)
