"""ONNX form of a quantized Conv: QDQ around the Conv node, which stays in place.

- weight: its codes reshaped back to [out, in/groups, k...] behind DequantizeLinear (per output
  channel, axis 0); weights in groups along the flattened reduction axis use the opset-21 blocked
  DequantizeLinear on the [out, in/groups * k...] view and a Reshape (MatMulNBits has no conv form).
  4-bit codes are stored as int4/uint4 at opset >= 21, else in int8/uint8 containers.
- activation: the shared input Q/DQ (`act_float`: static, or dynamic per tensor in float).
- W8A8 static: a Q/DQ on the output as well, so that ORT fuses DQ -> Conv -> Q into QLinearConv
  (measured: without the output Q it runs a float FusedConv on dequantized inputs). The bias stays
  float; ORT folds it into the fused kernel.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qpass.errors import UnsupportedOpError
from qpass.graph.refs import OpRef
from qpass.lowering.onnx_activations import act_float, static_qdq
from qpass.lowering.onnx_nodes import BLOCKED_DQ_OPSET, const, model_opset, new_node
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear


def lower_conv_onnx(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """Put Q/DQ around one Conv node (see the module docstring)."""
    form = linear_form(q, op.name)
    if form not in (LinearForm.FLOAT_WEIGHT, LinearForm.INTEGER) or q.g_idx is not None:
        msg = f"node '{op.name}': Conv is lowered for plain integer weights only, not {form.value}"
        raise UnsupportedOpError(msg)
    if q.act is not None:
        node.replace_input_with(0, act_float(view, node, q))
    if form is LinearForm.INTEGER:
        w_value = node.inputs[1]
        node.replace_input_with(1, _weight_dq(view, node, op, q))
        if not w_value.uses() and w_value.is_initializer():
            view.model.graph.initializers.pop(w_value.name)
    if q.out_qparams is not None:
        _quantize_output(view, node, q)


def _code_dtype(view, q: QLinear):
    signed = q.zero_points is None
    if q.bits <= 4 and model_opset(view.model) >= BLOCKED_DQ_OPSET:
        view.model.ir_version = max(view.model.ir_version or 0, 10)  # int4 tensors
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    if q.bits > 8:
        msg = f"{q.bits}-bit Conv weights are not lowered (8 bits at most)"
        raise UnsupportedOpError(msg)
    return np.int8 if signed else np.uint8


def _weight_dq(view, node: ir.Node, op: OpRef, q: QLinear) -> ir.Value:
    graph = view.model.graph
    name = node.inputs[1].name
    dtype = _code_dtype(view, q)
    codes = q.codes.numpy()
    scales = q.scales.numpy().astype(np.float32)
    zp = None if q.zero_points is None else q.zero_points.numpy()
    if q.per_channel:
        qw = const(view, f"{name}_quantized", codes.reshape(q.conv_shape).astype(dtype))
        zp_arr = np.zeros(codes.shape[0], dtype) if zp is None else zp[:, 0].astype(dtype)
        inputs = [
            qw,
            const(view, f"{name}_scale", scales[:, 0].copy()),
            const(view, f"{name}_zero_point", zp_arr),
        ]
        dq = new_node(
            view, "DequantizeLinear", inputs, f"{node.name}_weight_dq", out=f"{name}_dequantized", axis=0
        )
        graph.insert_before(node, dq)
        return dq.outputs[0]
    if model_opset(view.model) < BLOCKED_DQ_OPSET:
        msg = (
            f"node '{op.name}': Conv weights in groups of {q.group_size} need the blocked DequantizeLinear "
            f"of opset {BLOCKED_DQ_OPSET} (model has {model_opset(view.model)}); re-export at opset "
            f"{BLOCKED_DQ_OPSET} or quantize per output channel (no 'weights.group')"
        )
        raise UnsupportedOpError(msg)
    inputs = [const(view, f"{name}_quantized", codes.astype(dtype)), const(view, f"{name}_scale", scales)]
    if zp is not None:
        inputs.append(const(view, f"{name}_zero_point", zp.astype(dtype)))
    dq = new_node(
        view, "DequantizeLinear", inputs, f"{node.name}_weight_dq", axis=1, block_size=int(q.group_size)
    )
    shape = const(view, f"{name}_shape", np.asarray(q.conv_shape, np.int64))
    reshape = new_node(
        view, "Reshape", [dq.outputs[0], shape], f"{node.name}_weight", out=f"{name}_dequantized"
    )
    graph.insert_before(node, [dq, reshape])
    return reshape.outputs[0]


def _quantize_output(view, node: ir.Node, q: QLinear) -> None:
    """Q/DQ on the conv output; every reader takes the DQ, and linears reading it reuse it."""
    y = node.outputs[0]
    out_q = dataclasses.replace(q, act_qparams=q.out_qparams)
    dq_out, nodes = static_qdq(view, y, out_q)
    dq_out.shape, dq_out.type = y.shape, y.type
    view.model.graph.insert_after(node, nodes)
    y.replace_all_uses_with(dq_out)
    nodes[0].replace_input_with(0, y)  # the QuantizeLinear itself still reads the conv output
    view.lowered_inputs[(y.name, "float", q.act)] = dq_out
    view.lowered_inputs[(dq_out.name, "float", q.act)] = dq_out
    _drop_covered_clamp(view, dq_out, q)


def _drop_covered_clamp(view, dq_out: ir.Value, q: QLinear) -> None:
    """Remove a Relu / Clip reading the output DQ when the output codes already lie in its bounds.

    The plan narrows the output range to the clamp's bounds when the code grid fits inside them, so
    clip(DQ(Q(y))) = DQ(Q(y)): the clamp is an identity there. Left in place, ORT runs it in float
    between a DequantizeLinear and the next conv's QuantizeLinear (measured on EfficientNet-Lite2:
    43 float Clips between the QLinearConvs); removed, the next conv reads the same DQ and ORT chains
    the integer kernels.
    """
    readers = list(dq_out.uses())
    if len(readers) != 1:
        return
    clamp = readers[0].node
    if clamp.op_type not in ("Relu", "Clip") or clamp.name not in view._nodes:
        return
    bounds = view.clip_bounds(view._op(clamp))
    qp = q.out_qparams
    lo, hi = (qp.qmin - qp.zero_point) * qp.scale, (qp.qmax - qp.zero_point) * qp.scale
    if bounds is None or lo < bounds[0] - 1e-6 or hi > bounds[1] + 1e-6:
        return
    out = clamp.outputs[0]
    if out.is_graph_output():
        return
    out.replace_all_uses_with(dq_out)
    view.model.graph.remove(clamp, safe=True)
