"""ONNX form of a linear's activation quantization: dynamic absmax codes (per token or per tensor),
static QDQ, block-format fake quantization, and the uint8 codes MatMulIntegerToFloat takes.

Each quantized activation is built once per (value, config) and cached on the view
(`view.lowered_inputs`), so the linears reading the same activation share its nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qpass.errors import UnsupportedOpError
from qpass.lowering.onnx_block_formats import block_fake_quant
from qpass.lowering.onnx_nodes import const, insert_for_input, model_opset, new_node
from qpass.qconfig import ActGranularity, format_bits, is_block_format
from qpass.quant.qlinear import QLinear


def reduce_max(view, x: ir.Value, name: str, per_token: bool) -> ir.Node:
    """ReduceMax over the last axis (per token, keepdims) or over everything (per tensor)."""
    opset = model_opset(view.model)
    if not per_token:
        return new_node(view, "ReduceMax", [x], name, keepdims=0)
    if opset >= 18:
        axes = const(view, f"{name}_axes", np.asarray([-1], np.int64))
        return new_node(view, "ReduceMax", [x, axes], name, keepdims=1)
    return new_node(view, "ReduceMax", [x], name, keepdims=1, axes=[-1])


def absmax_scale(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, list[ir.Node]]:
    """Symmetric dynamic scale of x: max|x| / qmax per token (keepdims) or per tensor (scalar),
    the float32 `tiny` where the max is 0 (codes 0 and output 0, as the reference's scale 1).
    """
    qmax = float(2 ** (format_bits(q.act.format) - 1) - 1)
    per_token = q.act.granularity is ActGranularity.PER_TOKEN
    base = f"{x.name}_{'tok' if per_token else 'dyn'}"
    absx = new_node(view, "Abs", [x], f"{base}_abs")
    amax = reduce_max(view, absx.outputs[0], f"{base}_amax", per_token)
    qmax_c = const(view, f"{base}_qmax", np.asarray(qmax, np.float32))
    scale = new_node(view, "Div", [amax.outputs[0], qmax_c], f"{base}_scale0")
    tiny = const(view, f"{base}_tiny", np.asarray(np.finfo(np.float32).tiny, np.float32))
    safe = new_node(view, "Max", [scale.outputs[0], tiny], f"{base}_scale")
    return safe.outputs[0], [absx, amax, scale, safe]


def dynamic_codes(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """Integer codes of x (as float, exact integers) and its scale: symmetric absmax / qmax.

    Same arithmetic as the torch reference: s = max|x| / qmax (1 where the max is 0),
    codes = round_half_even(x / s), |codes| <= qmax by construction.
    """
    scale, nodes = absmax_scale(view, x, q)
    base = f"{x.name}_{'tok' if q.act.granularity is ActGranularity.PER_TOKEN else 'dyn'}"
    div = new_node(view, "Div", [x, scale], f"{base}_div")
    # |x / s| <= qmax up to one ulp, which Round cannot push past qmax: no Clip needed
    rnd = new_node(view, "Round", [div.outputs[0]], f"{base}_round")
    return rnd.outputs[0], scale, [*nodes, div, rnd]


def act_float(view, node: ir.Node, q: QLinear) -> ir.Value:
    """The linear's input quantized-dequantized in float (shared by all linears reading it)."""
    x = node.inputs[0]
    key = (x.name, "float", q.act)
    cache = view.lowered_inputs
    if key in cache:
        return cache[key]
    if q.act_qparams is not None:
        out, nodes = static_qdq(view, x, q)
    elif is_block_format(q.act.format):  # FP8 / MX / NVFP4 / BFP: a qpass.FakeQuant<FMT> function op
        out, nodes = block_fake_quant(view, x, q)
    else:
        codes, scale, nodes = dynamic_codes(view, x, q)
        mul = new_node(view, "Mul", [codes, scale], f"{x.name}_fq")
        nodes.append(mul)
        out = mul.outputs[0]
    out.shape, out.type = x.shape, x.type
    insert_for_input(view, x, nodes)
    cache[key] = out
    return out


def static_qdq(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, list[ir.Node]]:
    qp = q.act_qparams
    if q.act.format != "int8":
        msg = f"activation '{x.name}': static {q.act.format} activations are not lowered (QDQ takes int8)"
        raise UnsupportedOpError(msg)
    zdtype = np.int8 if qp.signed else np.uint8
    s = const(view, f"{x.name}_scale", np.asarray(qp.scale, np.float32))
    z = const(view, f"{x.name}_zero_point", np.asarray(qp.zero_point, zdtype))
    qn = new_node(view, "QuantizeLinear", [x, s, z], f"{x.name}_q", out=f"{x.name}_quantized")
    dqn = new_node(
        view, "DequantizeLinear", [qn.outputs[0], s, z], f"{x.name}_dq", out=f"{x.name}_dequantized"
    )
    return dqn.outputs[0], [qn, dqn]


def uint8_codes(view, x: ir.Value, q: QLinear, base: str):
    """(uint8 codes, row scales or None, zero point 128, a_scale, nodes): the dynamic codes of x.

    Per token: QuantizeLinear(x / s, 1, 128) rounds (half to even, as Round), shifts and casts;
    the row scales multiply the output. A per-axis QuantizeLinear on x viewed as [rows, C] saves
    the Div but its kernel is as slow as Div + per-tensor QuantizeLinear together (ORT profiler,
    384x1536 at 4096 rows: 0.45 vs 0.47 ms), so the simpler form stays. Per tensor: the scalar
    scale goes into QuantizeLinear and is MatMulIntegerToFloat's a_scale (no Div, no row Mul).
    """
    scale, nodes = absmax_scale(view, x, q)
    one = const(view, f"{base}_unit_scale", np.asarray(1.0, np.float32))
    zp = const(view, f"{base}_zero_point", np.asarray(128, np.uint8))
    if q.act.granularity is not ActGranularity.PER_TOKEN:
        codes = new_node(view, "QuantizeLinear", [x, scale, zp], f"{base}_codes")
        return codes.outputs[0], None, zp, scale, [*nodes, codes]
    div = new_node(view, "Div", [x, scale], f"{base}_div")
    codes = new_node(view, "QuantizeLinear", [div.outputs[0], one, zp], f"{base}_codes")
    return codes.outputs[0], scale, zp, one, [*nodes, div, codes]
