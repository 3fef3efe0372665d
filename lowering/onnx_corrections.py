"""ONNX form of a quantized linear's float corrections: low-rank compensation and kept weights.

Same arithmetic as `qpass.lowering.torch_corrections`: ``y = Q(x) W_qᵀ + (Q(x) Vᵀ) Uᵀ + sparse(Q(x))``
with ``Q`` the linear's activation quantization (identity for weight-only recipes). Before the
linear itself is lowered, its output is rerouted through one ``Add`` with the correction terms:
LoRC is two small MatMuls (``[in, r]`` then ``[r, out]``); the kept weights are a ``Gather`` of
the few input channels that hold any, times a ``[channels, out]`` float matrix holding only them
(their quantized codes are the zero code, so nothing is counted twice). The main linear then
lowers to whatever form it takes, untouched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from qpass.lowering.onnx_nodes import new_node
from qpass.quant.qlinear import QLinear


def add_corrections(view, node: ir.Node, q: QLinear, x: ir.Value) -> None:
    """Insert ``node_out + corrections(x)`` after `node` and hand the node's readers the sum.

    `x` is the input the corrections read (the activation-quantized input when the recipe
    quantizes activations).
    """
    graph = view.model.graph
    y = node.outputs[0]
    readers = list(y.uses())
    is_output = y in graph.outputs
    terms: list[ir.Value] = []
    nodes: list[ir.Node] = []
    base = node.name
    if q.lorc_u is not None:
        vt = view.add_initializer(
            f"{base}_lorc_vt", np.ascontiguousarray(q.lorc_v.T.numpy().astype(np.float32))
        )
        ut = view.add_initializer(
            f"{base}_lorc_ut", np.ascontiguousarray(q.lorc_u.T.numpy().astype(np.float32))
        )
        down = new_node(view, "MatMul", [x, vt], f"{base}_lorc_down")
        up = new_node(view, "MatMul", [down.outputs[0], ut], f"{base}_lorc_up")
        nodes += [down, up]
        terms.append(up.outputs[0])
    if q.outlier_values is not None:
        cols, where = torch.unique(q.outlier_cols, return_inverse=True)
        dense = torch.zeros(cols.numel(), q.codes.shape[0], dtype=torch.float32)
        dense.index_put_((where, q.outlier_rows), q.outlier_values.to(torch.float32), accumulate=True)
        idx = view.add_initializer(f"{base}_kept_cols", cols.numpy().astype(np.int64))
        mat = view.add_initializer(f"{base}_kept_weights", dense.numpy())
        gather = new_node(view, "Gather", [x, idx], f"{base}_kept_gather", axis=-1)
        mm = new_node(view, "MatMul", [gather.outputs[0], mat], f"{base}_kept")
        nodes += [gather, mm]
        terms.append(mm.outputs[0])
    total = y
    for i, t in enumerate(terms):
        add = new_node(view, "Add", [total, t], f"{base}_corrected{i}")
        nodes.append(add)
        total = add.outputs[0]
    total.shape, total.type = y.shape, y.type
    graph.insert_after(node, nodes)
    for reader, index in readers:
        reader.replace_input_with(index, total)
    if is_output:
        i = list(graph.outputs).index(y)
        name = y.name
        y.name = view.fresh_name(f"{name}_uncorrected")
        total.name = name
        graph.outputs[i] = total
