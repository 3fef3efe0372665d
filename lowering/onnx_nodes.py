"""Node-building helpers shared by the ONNX lowerings: named constants and nodes, inserting
activation-side nodes after their producer, and swapping a MatMul/Gemm for its lowered nodes.

Every ONNX lowering module builds nodes the same way (fresh names from the view, Gemm's bias
re-added, the float weight initializer dropped once unused); keeping that here means a fix to
naming or bias handling reaches every lowered form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
BLOCKED_DQ_OPSET = 21  # DequantizeLinear with block_size, int4 types
MS_DOMAIN = "com.microsoft"
QPASS_DOMAIN = "qpass"  # our function ops (Hadamard, block-format decode and fake quantization)


def model_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def const(view, base: str, array: np.ndarray) -> ir.Value:
    return view.add_initializer(base, np.ascontiguousarray(array))


def new_node(view, op_type: str, inputs, name: str, *, domain: str = "", out: str | None = None, **attrs):
    node = ir.node(op_type, list(inputs), attributes=attrs or None, domain=domain, name=view.fresh_name(name))
    node.outputs[0].name = view.fresh_name(out or f"{name}_out")
    return node


def insert_for_input(view, x: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert nodes computing from activation x right after its producer (or at the top)."""
    graph = view.model.graph
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(graph.node(0), nodes)


def replace_linear(view, node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Swap `node` (MatMul or Gemm) for `new_nodes`, whose last output takes its place."""
    graph = view.model.graph
    old_out = node.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        add = new_node(view, "Add", [new_nodes[-1].outputs[0], node.inputs[2]], f"{node.name}_bias")
        new_nodes = [*new_nodes, add]
    new_out = new_nodes[-1].outputs[0]
    new_out.shape, new_out.type = old_out.shape, old_out.type
    w_value = node.inputs[1]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old_out], [new_out])
    if w_value is not None and not w_value.uses() and w_value.is_initializer():
        graph.initializers.pop(w_value.name)
