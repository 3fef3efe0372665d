"""ONNX forms of integer weight x integer activation linears: static QDQ that ORT fuses, dynamic
activations on com.microsoft MatMulIntegerToFloat, and the LLM.int8 decomposition (an integer part
over the normal channels plus a float MatMul over the outlier channels).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qpass.errors import UnsupportedOpError
from qpass.graph.refs import OpRef
from qpass.lowering.onnx_activations import act_float, uint8_codes
from qpass.lowering.onnx_nodes import MS_DOMAIN, const, insert_for_input, new_node, replace_linear
from qpass.qconfig import ActGranularity
from qpass.quant.qlinear import QLinear


def lower_qdq(view, node: ir.Node, q: QLinear) -> None:
    """Symmetric INT8 per-channel weight as DequantizeLinear(axis); activation Q/DQ (static)."""
    graph = view.model.graph
    w_value = node.inputs[1]
    codes = q.codes.numpy().astype(np.int8)
    if q.weight.out_axis == 1:
        codes = codes.T  # stored [in, out]
    qw = const(view, f"{w_value.name}_quantized", codes)
    scale = const(view, f"{w_value.name}_scale", q.scales.reshape(-1).numpy().astype(np.float32))
    zp = const(view, f"{w_value.name}_zero_point", np.zeros(codes.shape[q.weight.out_axis], np.int8))
    dq = new_node(
        view,
        "DequantizeLinear",
        [qw, scale, zp],
        f"{node.name}_weight_dq",
        out=f"{w_value.name}_dequantized",
        axis=q.weight.out_axis,
    )
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    if not w_value.uses() and w_value.is_initializer():
        graph.initializers.pop(w_value.name)
    if q.act is not None:
        node.replace_input_with(0, act_float(view, node, q))


def lower_dynamic_integer(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """Dynamic symmetric activations x symmetric per-channel weights on MatMulIntegerToFloat.

    y = MatMulIntegerToFloat(codes(x) + 128 as uint8, W_codes int8, a_zero_point 128, b_scale
    s_w[channel]) * s_x[row]; exact in int32. The codes are shifted to uint8 because ORT's integer
    GEMM runs u8 x s8 on MLAS but int8 x int8 on a path 8-40x slower here
    (benchmarks/results/onnx_dynamic_candidates.md). One QuantizeLinear(x / s, 1, 128) rounds
    (half to even, as Round), shifts and casts; com.microsoft MatMulIntegerToFloat applies the
    channel scales in its epilogue: ORT's profiler on MiniLM at batch 32 showed the earlier
    Round + Add + Cast and MatMulInteger + Cast + Mul + Mul chains as 3 extra passes over the
    activation and 2 over the output (benchmarks/results/onnxruntime_vs_peers.md).
    """
    x = node.inputs[0]
    key = (x.name, "uint8", q.act)
    cache = view.lowered_inputs
    if key not in cache:
        *operands, nodes = uint8_codes(view, x, q, x.name)
        insert_for_input(view, x, nodes)
        cache[key] = tuple(operands)
    codes_kn = q.codes.numpy().astype(np.int8).T  # [K, N]
    replace_linear(view, node, integer_matmul(view, node, op, q, cache[key], codes_kn))


def integer_matmul(
    view, node: ir.Node, op: OpRef, q: QLinear, operands, codes_kn: np.ndarray
) -> list[ir.Node]:
    """MatMulIntegerToFloat(codes, W [K, N] int8, channel scales in its epilogue) * row scales
    (per token; per tensor the activation scale is its a_scale).
    """
    xq, xs, xzp, one = operands
    view.model.opset_imports.setdefault(MS_DOMAIN, 1)
    w_name = node.inputs[1].name
    wq = const(view, f"{w_name}_quantized", codes_kn)
    ws = const(view, f"{w_name}_scale", q.scales.reshape(-1).numpy().astype(np.float32))
    mm = new_node(view, "MatMulIntegerToFloat", [xq, wq, one, ws, xzp], f"{op.name}_int", domain=MS_DOMAIN)
    if xs is None:  # per tensor: the scale is a_scale
        return [mm]
    by_row = new_node(view, "Mul", [mm.outputs[0], xs], f"{op.name}_row_scale")
    return [mm, by_row]


def lower_decomposed(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """The per-token integer form over x[..., normal] plus MatMul(x[..., outliers], W_out), added."""
    dynamic_per_token = (
        q.act is not None and q.act_qparams is None and q.act.granularity is ActGranularity.PER_TOKEN
    )
    if not (q.per_channel and q.zero_points is None and q.g_idx is None and dynamic_per_token):
        msg = (
            f"node '{op.name}': int8_decompose is lowered for symmetric per-channel weights and dynamic "
            "per-token activations only (recipe keys 'weights', 'activations')"
        )
        raise UnsupportedOpError(msg)
    x = node.inputs[0]
    fp = q.fp_channels.numpy().astype(np.int64)
    normal = np.setdiff1d(np.arange(q.codes.shape[1]), fp).astype(np.int64)
    key = (x.name, "decomposed", q.act, fp.tobytes())
    cache = view.lowered_inputs
    if key not in cache:
        idx_n = const(view, f"{x.name}_normal_channels", normal)
        idx_o = const(view, f"{x.name}_outlier_channels", fp)
        x_n = new_node(view, "Gather", [x, idx_n], f"{x.name}_normal", axis=-1)
        x_o = new_node(view, "Gather", [x, idx_o], f"{x.name}_outliers", axis=-1)
        *operands, nodes = uint8_codes(view, x_n.outputs[0], q, f"{x.name}_normal")
        insert_for_input(view, x, [x_n, x_o, *nodes])
        cache[key] = (tuple(operands), x_o.outputs[0])
    operands, xo = cache[key]
    w_name = node.inputs[1].name
    codes_kn = q.codes.numpy().astype(np.int8)[:, normal].T  # [Kn, N]
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    wo = const(view, f"{w_name}_outlier_rows", q.fp_weight.numpy().T.astype(dtype))  # [Ko, N]
    int_nodes = integer_matmul(view, node, op, q, operands, codes_kn)
    mm_fp = new_node(view, "MatMul", [xo, wo], f"{op.name}_outliers")
    add = new_node(view, "Add", [int_nodes[-1].outputs[0], mm_fp.outputs[0]], f"{op.name}_sum")
    replace_linear(view, node, [*int_nodes, mm_fp, add])
