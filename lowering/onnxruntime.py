"""ONNX Runtime lowering: each quantized linear becomes the ops stock onnxruntime runs fast.

Which form a `QLinear` takes (the recipe's `lowering:` options, `OnnxLoweringConfig`):
- INT8 symmetric per-channel weights, static per-tensor activations: QuantizeLinear /
  DequantizeLinear (QDQ) that ORT fuses into its integer kernels; one Q/DQ pair per activation,
  shared by all the linears reading it.
- symmetric per-channel weights (any width <= 8 stored as int8), dynamic activations (per token or
  per tensor, symmetric): the activation is quantized in the graph (absmax -> scale ->
  QuantizeLinear(x / s, 1, 128) to uint8), multiplied by com.microsoft MatMulIntegerToFloat
  (u8 x s8, a_zero_point 128, channel scales in its epilogue) and by the row scale. The torch
  reference (`fake_quant_act` x dequantized weight) up to float rounding of the rescale.
  Measured against int8 x int8, DynamicQuantizeLinear (per tensor) and DynamicQuantizeMatMul
  in `benchmarks/onnx_dynamic_candidates.py`: per tensor is ~2x faster but 2-4x less accurate
  (one outlier token coarsens all), so not the recipe's semantics.
- everything else with integer weights (INT4/INT8, groups, zero points, GPTQ act-order `g_idx`):
  com.microsoft MatMulNBits, or (`weight_op: dequantize_linear`) the opset-21 blocked
  DequantizeLinear + MatMul; activations, if quantized, are fake-quantized in float before it.
- LLM.int8 decomposition (`QLinear.fp_channels`): Gather of the normal channels -> the per-token
  MatMulIntegerToFloat form above with the weight's normal rows, plus Gather of the outlier channels ->
  float MatMul with their weight rows, and one Add. Both Gathers and the quantization are shared
  by the linears reading the same activation; the weight row selections are done offline.
- float and block formats (FP8, MX, NVFP4, BFP), weights and activations: qpass-domain function
  ops (lowering/onnx_block_formats.py).
- Conv: Q/DQ around the Conv node, output included for W8A8 static, so ORT fuses QLinearConv
  (lowering/onnx_conv.py).
"""

from __future__ import annotations

import onnx_ir as ir

from qpass.errors import UnsupportedOpError
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.refs import OpRef
from qpass.lowering.onnx_activations import act_float
from qpass.lowering.onnx_block_formats import lower_block_weight
from qpass.lowering.onnx_conv import lower_conv_onnx
from qpass.lowering.onnx_corrections import add_corrections
from qpass.lowering.onnx_integer import lower_decomposed, lower_dynamic_integer, lower_qdq
from qpass.lowering.onnx_nbits import lower_blocked_dq, lower_matmulnbits
from qpass.lowering.onnx_nodes import MIN_OPSET, model_opset, replace_linear
from qpass.qconfig import ActGranularity, OnnxLoweringConfig, WeightOp, is_block_format
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear, QuantPlan


def lower_onnx(view: OnnxGraphView, plan: QuantPlan, config: OnnxLoweringConfig | None = None) -> None:
    """Lower every quantized linear of the plan (`config`: the recipe's `lowering` section)."""
    for edit in plan.edits:
        lower_linear_onnx(view, edit.op, edit.qlinear, config)
    view.invalidate()


def lower_linear_onnx(
    view: OnnxGraphView, op: OpRef, q: QLinear, config: OnnxLoweringConfig | None = None
) -> None:
    """Replace one MatMul/Gemm by the lowered form of `q` (see the module docstring)."""
    config = config or OnnxLoweringConfig()
    model: ir.Model = view.model
    if model_opset(model) < MIN_OPSET:
        msg = f"node '{op.name}': ONNX lowering needs opset >= {MIN_OPSET}, model has {model_opset(model)}"
        raise UnsupportedOpError(msg)
    node = view.node(op)
    if q.is_conv:  # Q/DQ around the Conv node (lowering/onnx_conv.py)
        lower_conv_onnx(view, node, op, q)
        return
    _check_gemm(node, op)
    form = linear_form(q, op.name)
    if form is LinearForm.BLOCK_WEIGHT:  # FP8 / MX / NVFP4 / BFP weights
        a = act_float(view, node, q) if q.act is not None else node.inputs[0]
        replace_linear(view, node, lower_block_weight(view, node, op, q, a, config))
        return
    if q.act is not None and q.act_qparams is None and q.act.granularity is not ActGranularity.PER_TOKEN:
        if not q.act.dynamic:
            msg = f"node '{op.name}': static activations without calibrated parameters"
            raise UnsupportedOpError(msg)
    if form is LinearForm.FLOAT_WEIGHT:
        if q.act is not None:
            node.replace_input_with(0, act_float(view, node, q))
        return
    if form is LinearForm.DECOMPOSED:
        lower_decomposed(view, node, op, q)
        return
    if form is LinearForm.CORRECTED:  # LoRC / kept weights: an Add of small float terms after the linear
        x_corr = act_float(view, node, q) if q.act is not None else node.inputs[0]
        add_corrections(view, node, q, x_corr)
    if q.group_axis == "out":  # AdaDim: only the blocked DequantizeLinear has blocks along N
        if config.weight_op is WeightOp.MATMULNBITS:
            msg = (
                f"node '{op.name}': recipe key 'lowering.weight_op': matmulnbits blocks run along K; "
                "weights grouped along the output rows (weights.group_axis out/auto) need dequantize_linear"
            )
            raise UnsupportedOpError(msg)
        lower_blocked_dq(view, node, op, q)
        return
    block_act = q.act is not None and is_block_format(q.act.format)
    dynamic = q.act is not None and q.act_qparams is None and not block_act
    integer_ok = q.per_channel and q.zero_points is None and q.g_idx is None
    if config.weight_op is WeightOp.AUTO and integer_ok and dynamic:
        lower_dynamic_integer(view, node, op, q)
    elif config.weight_op is WeightOp.AUTO and integer_ok and q.bits == 8 and q.act_qparams is not None:
        lower_qdq(view, node, q)
    elif config.weight_op is WeightOp.DEQUANTIZE_LINEAR:
        lower_blocked_dq(view, node, op, q)
    else:
        lower_matmulnbits(view, node, op, q, config)


def _check_gemm(node: ir.Node, op: OpRef) -> None:
    if node.op_type != "Gemm":
        return
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    if alpha != 1.0 or beta != 1.0:
        msg = f"node '{op.name}': Gemm with alpha={alpha}, beta={beta} is not lowered (expected 1, 1)"
        raise UnsupportedOpError(msg)
