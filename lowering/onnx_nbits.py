"""ONNX forms of INTn weights with float (or fake-quantized) activations: com.microsoft MatMulNBits,
the opset-21 blocked DequantizeLinear + MatMul, and AdaDim's output-row groups below opset 21.
GPTQ act-order groups are made contiguous by permuting the input channels (weights offline, the
activation by one shared Gather) unless the recipe asks for MatMulNBits' g_idx input.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from qpass.errors import UnsupportedOpError
from qpass.graph.refs import OpRef
from qpass.lowering.nbits_probe import check_matmulnbits, layout_key
from qpass.lowering.onnx_activations import act_float
from qpass.lowering.onnx_nodes import (
    BLOCKED_DQ_OPSET,
    MS_DOMAIN,
    const,
    insert_for_input,
    model_opset,
    new_node,
    replace_linear,
)
from qpass.lowering.weight_packing import (
    PackedNBits,
    act_order_permutation,
    blocked_dq_arrays,
    matmulnbits_arrays,
)
from qpass.qconfig import OnnxLoweringConfig
from qpass.quant.qlinear import QLinear

_CHECKED_LAYOUTS: set[tuple] = set()


def lower_matmulnbits(view, node: ir.Node, op: OpRef, q: QLinear, config: OnnxLoweringConfig) -> None:
    """com.microsoft MatMulNBits: y = A @ dequant(B)^T with B [N, K] in blocks along K.

    GPTQ act-order: unless `lowering.g_idx`, the input channels are permuted so that groups are
    contiguous (the weight offline, the activation by a Gather shared by the linears reading it):
    ORT's kernel with a g_idx input runs ~2x slower at batch 1 on MiniLM
    (benchmarks/results/onnxruntime_vs_peers.md, first run).
    """
    order = None if config.g_idx else act_order_permutation(q)
    if order is not None:
        q = dataclasses.replace(q, codes=q.codes[:, torch.from_numpy(order)], g_idx=None)
    try:
        packed: PackedNBits = matmulnbits_arrays(q)
    except ValueError as exc:
        msg = f"node '{op.name}': cannot lower to MatMulNBits: {exc}"
        raise UnsupportedOpError(msg) from None
    key = (*layout_key(packed), config.accuracy_level)
    if key not in _CHECKED_LAYOUTS:  # once per layout and process: ORT reads it as qpass packed it
        check_matmulnbits(packed, q.dequantized_weight().numpy(), op.name, config.accuracy_level)
        _CHECKED_LAYOUTS.add(key)
    model: ir.Model = view.model
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    a = act_float(view, node, q) if q.act is not None else node.inputs[0]
    if order is not None:
        a = permuted(view, a, order)
    w_name = node.inputs[1].name
    inputs = [
        a,
        const(view, f"{w_name}_nbits", packed.b),
        const(view, f"{w_name}_nbits_scales", packed.scales),
        None if packed.zero_points is None else const(view, f"{w_name}_nbits_zp", packed.zero_points),
        None if packed.g_idx is None else const(view, f"{w_name}_g_idx", packed.g_idx),
    ]
    while inputs[-1] is None:
        inputs.pop()
    mnb = new_node(
        view,
        "MatMulNBits",
        inputs,
        f"{op.name}_nbits",
        domain=MS_DOMAIN,
        K=packed.k,
        N=packed.n,
        bits=packed.bits,
        block_size=packed.block_size,
        accuracy_level=config.accuracy_level,
    )
    replace_linear(view, node, [mnb])


def permuted(view, a: ir.Value, order: np.ndarray) -> ir.Value:
    """a[..., order], one Gather per (activation, permutation) shared by the linears reading it."""
    key = (a.name, "gather", order.tobytes())
    cache = view.lowered_inputs
    if key not in cache:
        idx = const(view, f"{a.name}_act_order", order.astype(np.int64))
        gather = new_node(view, "Gather", [a, idx], f"{a.name}_act_order", axis=-1)
        insert_for_input(view, a, [gather])
        cache[key] = gather.outputs[0]
    return cache[key]


def lower_blocked_dq(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """Opset-21 DequantizeLinear(int4/uint4 or int8/uint8 [K, N], block_size along K) + MatMul.

    GPTQ act-order groups are made contiguous by permuting the input channels: the weight rows
    offline, the activation with a Gather on its last axis.
    """
    model: ir.Model = view.model
    if model_opset(model) < BLOCKED_DQ_OPSET and q.group_axis == "out":
        lower_row_groups_per_axis(view, node, op, q)
        return
    if model_opset(model) < BLOCKED_DQ_OPSET:
        msg = (
            f"node '{op.name}': recipe key 'lowering.weight_op': dequantize_linear needs opset >= "
            f"{BLOCKED_DQ_OPSET} (blocked DequantizeLinear), the model has opset {model_opset(model)}; "
            "export at opset 21 or use weight_op: matmulnbits"
        )
        raise UnsupportedOpError(msg)
    try:
        arrays = blocked_dq_arrays(q)
    except ValueError as exc:
        msg = f"node '{op.name}': cannot lower to blocked DequantizeLinear: {exc}"
        raise UnsupportedOpError(msg) from None
    model.ir_version = max(model.ir_version or 0, 10)  # int4 tensors
    w_name = node.inputs[1].name
    nodes: list[ir.Node] = []
    a = act_float(view, node, q) if q.act is not None else node.inputs[0]
    if arrays.order is not None:
        a = permuted(view, a, arrays.order)
    dq_inputs = [
        const(view, f"{w_name}_quantized", arrays.codes),
        const(view, f"{w_name}_scale", arrays.scales),
    ]
    if arrays.zero_points is not None:
        dq_inputs.append(const(view, f"{w_name}_zero_point", arrays.zero_points))
    # blocks along K (axis 0 of [K, N]); per output channel: one scale per column (axis 1)
    attrs = (
        {"axis": 1} if arrays.block_size is None else {"axis": arrays.axis, "block_size": arrays.block_size}
    )
    dq = new_node(view, "DequantizeLinear", dq_inputs, f"{op.name}_weight_dq", **attrs)
    mm = new_node(view, "MatMul", [a, dq.outputs[0]], f"{op.name}_matmul")
    replace_linear(view, node, [*nodes, dq, mm])


def lower_row_groups_per_axis(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """AdaDim output-row groups below opset 21: W [K, N] viewed as [K * N/g, g] has one scale per
    row, so a per-axis (opset 13) DequantizeLinear on axis 0 plus a Reshape to [K, N] is exact.
    The codes sit in 8-bit containers (INT4 types need opset 21), so the file holds a byte per weight.
    """
    g = q.group_size
    k, n = q.codes.shape[1], q.codes.shape[0]
    if g is None or n % g:
        msg = f"node '{op.name}': output-row groups of {g} do not divide N={n}"
        raise UnsupportedOpError(msg)
    signed = q.zero_points is None
    dtype = np.int8 if signed else np.uint8
    codes = np.ascontiguousarray(q.codes.numpy().T).astype(dtype).reshape(k * n // g, g)
    scales = np.ascontiguousarray(q.scales.numpy().astype(np.float32).T).reshape(-1)  # [K, N/g] rows
    w_name = node.inputs[1].name
    dq_inputs = [const(view, f"{w_name}_quantized", codes), const(view, f"{w_name}_scale", scales)]
    if not signed:
        zp = np.ascontiguousarray(q.zero_points.numpy().T).astype(dtype).reshape(-1)
        dq_inputs.append(const(view, f"{w_name}_zero_point", zp))
    dq = new_node(view, "DequantizeLinear", dq_inputs, f"{op.name}_weight_dq", axis=0)
    shape = const(view, f"{w_name}_shape", np.asarray([k, n], np.int64))
    kn = new_node(view, "Reshape", [dq.outputs[0], shape], f"{op.name}_weight")
    a = act_float(view, node, q) if q.act is not None else node.inputs[0]
    mm = new_node(view, "MatMul", [a, kn.outputs[0]], f"{op.name}_matmul")
    replace_linear(view, node, [dq, kn, mm])
