"""ONNX Runtime lowering: quantized linears become QuantizeLinear/DequantizeLinear (QDQ) that
stock onnxruntime fuses into its integer kernels.

Weights are stored as INT8 initializers with per-output-channel scales (DequantizeLinear
with `axis`); a linear input gets one Q/DQ pair shared by all linears reading it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qpass.errors import UnsupportedOpError
from qpass.graph.view import OpRef
from qpass.qlinear import QLinear

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def lower_linear_onnx(view, op: OpRef, q: QLinear) -> None:
    """Insert DQ on the weight and Q/DQ on the activation input of one MatMul/Gemm."""
    model: ir.Model = view.model
    graph = model.graph
    if _opset(model) < MIN_OPSET:
        msg = f"node '{op.name}': QDQ lowering needs opset >= {MIN_OPSET}, model has {_opset(model)}"
        raise UnsupportedOpError(msg)
    node = view.node(op)
    if q.codes is not None and not q.integer_weight:
        msg = f"node '{op.name}': {q.spec.element.value} block weights are not lowered to ONNX yet (torch target)"
        raise UnsupportedOpError(msg)
    if q.codes is not None and (
        q.bits != 8 or not q.per_channel or q.zero_points is not None or q.g_idx is not None
    ):
        msg = (
            f"node '{op.name}': int{q.bits} {'grouped ' if not q.per_channel else ''}weights are not lowered to "
            "ONNX yet (QDQ takes symmetric int8 per channel); use the torch target"
        )
        raise UnsupportedOpError(msg)
    if q.act is not None and q.act.format != "int8":
        msg = f"node '{op.name}': {q.act.format} activations are not lowered to ONNX yet (QDQ takes int8)"
        raise UnsupportedOpError(msg)
    fresh = view.fresh_name
    if q.codes is not None:
        w_value = node.inputs[1]
        codes = q.codes.numpy()
        if q.weight.out_axis == 1:
            codes = codes.T  # stored [in, out]
        codes = np.ascontiguousarray(codes.astype(np.int8))
        qw = view.add_initializer(f"{w_value.name}_quantized", codes)
        scale = view.add_initializer(f"{w_value.name}_scale", q.scales.reshape(-1).numpy().astype(np.float32))
        zp = view.add_initializer(
            f"{w_value.name}_zero_point", np.zeros(codes.shape[q.weight.out_axis], np.int8)
        )
        dq = ir.node(
            "DequantizeLinear",
            [qw, scale, zp],
            attributes={"axis": q.weight.out_axis},
            name=fresh(f"{op.name}_weight_dq"),
        )
        dq.outputs[0].name = fresh(f"{w_value.name}_dequantized")
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if not w_value.uses() and w_value.is_initializer():
            graph.initializers.pop(w_value.name)
    if q.act is not None:
        if q.act_qparams is None:
            msg = (
                f"node '{op.name}': dynamic activation quantization is not lowered to ONNX yet; "
                "use activations.dynamic: false (per_tensor static)"
            )
            raise UnsupportedOpError(msg)
        x = node.inputs[0]
        cache = view.lowered_inputs
        dq_out = cache.get(x.name)
        if dq_out is None:
            qp = q.act_qparams
            zdtype = np.int8 if qp.signed else np.uint8
            s = view.add_initializer(f"{x.name}_scale", np.asarray(qp.scale, np.float32))
            z = view.add_initializer(f"{x.name}_zero_point", np.asarray(qp.zero_point, zdtype))
            qn = ir.node("QuantizeLinear", [x, s, z], name=fresh(f"{x.name}_q"))
            qn.outputs[0].name = fresh(f"{x.name}_quantized")
            dqn = ir.node("DequantizeLinear", [qn.outputs[0], s, z], name=fresh(f"{x.name}_dq"))
            dqn.outputs[0].name = fresh(f"{x.name}_dequantized")
            producer = x.producer()
            if producer is not None:
                graph.insert_after(producer, [qn, dqn])
            else:
                graph.insert_before(graph.node(0), [qn, dqn])
            dq_out = cache[x.name] = dqn.outputs[0]
        node.replace_input_with(0, dq_out)
