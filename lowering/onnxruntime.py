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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from qpass.errors import UnsupportedOpError
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.refs import OpRef
from qpass.lowering.onnx_block_formats import block_fake_quant, lower_block_weight
from qpass.lowering.weight_packing import (
    PackedNBits,
    act_order_permutation,
    blocked_dq_arrays,
    matmulnbits_arrays,
)
from qpass.qconfig import ActGranularity, OnnxLoweringConfig, WeightOp, format_bits, is_block_format
from qpass.quant.qlinear import QLinear, QuantPlan

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
BLOCKED_DQ_OPSET = 21  # DequantizeLinear with block_size, int4 types
MS_DOMAIN = "com.microsoft"


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


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
    if _opset(model) < MIN_OPSET:
        msg = f"node '{op.name}': ONNX lowering needs opset >= {MIN_OPSET}, model has {_opset(model)}"
        raise UnsupportedOpError(msg)
    node = view.node(op)
    _check_gemm(node, op)
    block_act = q.act is not None and is_block_format(q.act.format)
    if q.codes is not None and not q.integer_weight:  # FP8 / MX / NVFP4 / BFP weights
        a = _act_float(view, node, q) if q.act is not None else node.inputs[0]
        _replace_linear(view, node, lower_block_weight(view, node, op, q, a, config))
        return
    if q.act is not None and q.act_qparams is None and q.act.granularity is not ActGranularity.PER_TOKEN:
        if not q.act.dynamic:
            msg = f"node '{op.name}': static activations without calibrated parameters"
            raise UnsupportedOpError(msg)
    if q.codes is None:
        if q.act is not None:
            node.replace_input_with(0, _act_float(view, node, q))
        return
    if q.fp_channels is not None:
        _lower_decomposed(view, node, op, q)
        return
    if q.has_corrections:  # LoRC / kept weights: an Add of small float terms after the linear
        from qpass.lowering.onnx_corrections import add_corrections

        x_corr = _act_float(view, node, q) if q.act is not None else node.inputs[0]
        add_corrections(view, node, q, x_corr, _new_node)
    if q.group_axis == "out":  # AdaDim: only the blocked DequantizeLinear has blocks along N
        if config.weight_op is WeightOp.MATMULNBITS:
            msg = (
                f"node '{op.name}': recipe key 'lowering.weight_op': matmulnbits blocks run along K; "
                "weights grouped along the output rows (weights.group_axis out/auto) need dequantize_linear"
            )
            raise UnsupportedOpError(msg)
        _lower_blocked_dq(view, node, op, q)
        return
    dynamic = q.act is not None and q.act_qparams is None and not block_act
    integer_ok = q.per_channel and q.zero_points is None and q.g_idx is None
    if config.weight_op is WeightOp.AUTO and integer_ok and dynamic:
        _lower_dynamic_integer(view, node, op, q)
    elif config.weight_op is WeightOp.AUTO and integer_ok and q.bits == 8 and q.act_qparams is not None:
        _lower_qdq(view, node, q)
    elif config.weight_op is WeightOp.DEQUANTIZE_LINEAR:
        _lower_blocked_dq(view, node, op, q)
    else:
        _lower_matmulnbits(view, node, op, q, config)


def _check_gemm(node: ir.Node, op: OpRef) -> None:
    if node.op_type != "Gemm":
        return
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    if alpha != 1.0 or beta != 1.0:
        msg = f"node '{op.name}': Gemm with alpha={alpha}, beta={beta} is not lowered (expected 1, 1)"
        raise UnsupportedOpError(msg)


# ------------------------------------------------------------------------------ helpers


def _const(view, base: str, array: np.ndarray) -> ir.Value:
    return view.add_initializer(base, np.ascontiguousarray(array))


def _new_node(view, op_type: str, inputs, name: str, *, domain: str = "", out: str | None = None, **attrs):
    node = ir.node(op_type, list(inputs), attributes=attrs or None, domain=domain, name=view.fresh_name(name))
    node.outputs[0].name = view.fresh_name(out or f"{name}_out")
    return node


def _insert_for_input(view, x: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert nodes computing from activation x right after its producer (or at the top)."""
    graph = view.model.graph
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(graph.node(0), nodes)


def _replace_linear(view, node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Swap `node` (MatMul or Gemm) for `new_nodes`, whose last output takes its place."""
    graph = view.model.graph
    old_out = node.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        add = _new_node(view, "Add", [new_nodes[-1].outputs[0], node.inputs[2]], f"{node.name}_bias")
        new_nodes = [*new_nodes, add]
    new_out = new_nodes[-1].outputs[0]
    new_out.shape, new_out.type = old_out.shape, old_out.type
    w_value = node.inputs[1]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old_out], [new_out])
    if w_value is not None and not w_value.uses() and w_value.is_initializer():
        graph.initializers.pop(w_value.name)


# ------------------------------------------------------------------------------ activations


def _reduce_max(view, x: ir.Value, name: str, per_token: bool) -> ir.Node:
    """ReduceMax over the last axis (per token, keepdims) or over everything (per tensor)."""
    opset = _opset(view.model)
    if not per_token:
        return _new_node(view, "ReduceMax", [x], name, keepdims=0)
    if opset >= 18:
        axes = _const(view, f"{name}_axes", np.asarray([-1], np.int64))
        return _new_node(view, "ReduceMax", [x, axes], name, keepdims=1)
    return _new_node(view, "ReduceMax", [x], name, keepdims=1, axes=[-1])


def _absmax_scale(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, list[ir.Node]]:
    """Symmetric dynamic scale of x: max|x| / qmax per token (keepdims) or per tensor (scalar),
    the float32 `tiny` where the max is 0 (codes 0 and output 0, as the reference's scale 1).
    """
    qmax = float(2 ** (format_bits(q.act.format) - 1) - 1)
    per_token = q.act.granularity is ActGranularity.PER_TOKEN
    base = f"{x.name}_{'tok' if per_token else 'dyn'}"
    absx = _new_node(view, "Abs", [x], f"{base}_abs")
    amax = _reduce_max(view, absx.outputs[0], f"{base}_amax", per_token)
    qmax_c = _const(view, f"{base}_qmax", np.asarray(qmax, np.float32))
    scale = _new_node(view, "Div", [amax.outputs[0], qmax_c], f"{base}_scale0")
    tiny = _const(view, f"{base}_tiny", np.asarray(np.finfo(np.float32).tiny, np.float32))
    safe = _new_node(view, "Max", [scale.outputs[0], tiny], f"{base}_scale")
    return safe.outputs[0], [absx, amax, scale, safe]


def _dynamic_codes(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """Integer codes of x (as float, exact integers) and its scale: symmetric absmax / qmax.

    Same arithmetic as the torch reference: s = max|x| / qmax (1 where the max is 0),
    codes = round_half_even(x / s), |codes| <= qmax by construction.
    """
    scale, nodes = _absmax_scale(view, x, q)
    base = f"{x.name}_{'tok' if q.act.granularity is ActGranularity.PER_TOKEN else 'dyn'}"
    div = _new_node(view, "Div", [x, scale], f"{base}_div")
    # |x / s| <= qmax up to one ulp, which Round cannot push past qmax: no Clip needed
    rnd = _new_node(view, "Round", [div.outputs[0]], f"{base}_round")
    return rnd.outputs[0], scale, [*nodes, div, rnd]


def _act_float(view, node: ir.Node, q: QLinear) -> ir.Value:
    """The linear's input quantized-dequantized in float (shared by all linears reading it)."""
    x = node.inputs[0]
    key = (x.name, "float", q.act)
    cache = view.lowered_inputs
    if key in cache:
        return cache[key]
    if q.act_qparams is not None:
        out, nodes = _static_qdq(view, x, q)
    elif is_block_format(q.act.format):  # FP8 / MX / NVFP4 / BFP: a qpass.FakeQuant<FMT> function op
        out, nodes = block_fake_quant(view, x, q)
    else:
        codes, scale, nodes = _dynamic_codes(view, x, q)
        mul = _new_node(view, "Mul", [codes, scale], f"{x.name}_fq")
        nodes.append(mul)
        out = mul.outputs[0]
    out.shape, out.type = x.shape, x.type
    _insert_for_input(view, x, nodes)
    cache[key] = out
    return out


def _static_qdq(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, list[ir.Node]]:
    qp = q.act_qparams
    if q.act.format != "int8":
        msg = f"activation '{x.name}': static {q.act.format} activations are not lowered (QDQ takes int8)"
        raise UnsupportedOpError(msg)
    zdtype = np.int8 if qp.signed else np.uint8
    s = _const(view, f"{x.name}_scale", np.asarray(qp.scale, np.float32))
    z = _const(view, f"{x.name}_zero_point", np.asarray(qp.zero_point, zdtype))
    qn = _new_node(view, "QuantizeLinear", [x, s, z], f"{x.name}_q", out=f"{x.name}_quantized")
    dqn = _new_node(
        view, "DequantizeLinear", [qn.outputs[0], s, z], f"{x.name}_dq", out=f"{x.name}_dequantized"
    )
    return dqn.outputs[0], [qn, dqn]


# ------------------------------------------------------------------------------ weight forms


def _lower_qdq(view, node: ir.Node, q: QLinear) -> None:
    """Symmetric INT8 per-channel weight as DequantizeLinear(axis); activation Q/DQ (static)."""
    graph = view.model.graph
    w_value = node.inputs[1]
    codes = q.codes.numpy().astype(np.int8)
    if q.weight.out_axis == 1:
        codes = codes.T  # stored [in, out]
    qw = _const(view, f"{w_value.name}_quantized", codes)
    scale = _const(view, f"{w_value.name}_scale", q.scales.reshape(-1).numpy().astype(np.float32))
    zp = _const(view, f"{w_value.name}_zero_point", np.zeros(codes.shape[q.weight.out_axis], np.int8))
    dq = _new_node(
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
        node.replace_input_with(0, _act_float(view, node, q))


def _lower_dynamic_integer(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
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
        *operands, nodes = _uint8_codes(view, x, q, x.name)
        _insert_for_input(view, x, nodes)
        cache[key] = tuple(operands)
    codes_kn = q.codes.numpy().astype(np.int8).T  # [K, N]
    _replace_linear(view, node, _integer_matmul(view, node, op, q, cache[key], codes_kn))


def _uint8_codes(view, x: ir.Value, q: QLinear, base: str):
    """(uint8 codes, row scales or None, zero point 128, a_scale, nodes): the dynamic codes of x.

    Per token: QuantizeLinear(x / s, 1, 128) rounds (half to even, as Round), shifts and casts;
    the row scales multiply the output. A per-axis QuantizeLinear on x viewed as [rows, C] saves
    the Div but its kernel is as slow as Div + per-tensor QuantizeLinear together (ORT profiler,
    384x1536 at 4096 rows: 0.45 vs 0.47 ms), so the simpler form stays. Per tensor: the scalar
    scale goes into QuantizeLinear and is MatMulIntegerToFloat's a_scale (no Div, no row Mul).
    """
    scale, nodes = _absmax_scale(view, x, q)
    one = _const(view, f"{base}_unit_scale", np.asarray(1.0, np.float32))
    zp = _const(view, f"{base}_zero_point", np.asarray(128, np.uint8))
    if q.act.granularity is not ActGranularity.PER_TOKEN:
        codes = _new_node(view, "QuantizeLinear", [x, scale, zp], f"{base}_codes")
        return codes.outputs[0], None, zp, scale, [*nodes, codes]
    div = _new_node(view, "Div", [x, scale], f"{base}_div")
    codes = _new_node(view, "QuantizeLinear", [div.outputs[0], one, zp], f"{base}_codes")
    return codes.outputs[0], scale, zp, one, [*nodes, div, codes]


def _integer_matmul(
    view, node: ir.Node, op: OpRef, q: QLinear, operands, codes_kn: np.ndarray
) -> list[ir.Node]:
    """MatMulIntegerToFloat(codes, W [K, N] int8, channel scales in its epilogue) * row scales
    (per token; per tensor the activation scale is its a_scale).
    """
    xq, xs, xzp, one = operands
    view.model.opset_imports.setdefault(MS_DOMAIN, 1)
    w_name = node.inputs[1].name
    wq = _const(view, f"{w_name}_quantized", codes_kn)
    ws = _const(view, f"{w_name}_scale", q.scales.reshape(-1).numpy().astype(np.float32))
    mm = _new_node(view, "MatMulIntegerToFloat", [xq, wq, one, ws, xzp], f"{op.name}_int", domain=MS_DOMAIN)
    if xs is None:  # per tensor: the scale is a_scale
        return [mm]
    by_row = _new_node(view, "Mul", [mm.outputs[0], xs], f"{op.name}_row_scale")
    return [mm, by_row]


def _lower_decomposed(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
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
        idx_n = _const(view, f"{x.name}_normal_channels", normal)
        idx_o = _const(view, f"{x.name}_outlier_channels", fp)
        x_n = _new_node(view, "Gather", [x, idx_n], f"{x.name}_normal", axis=-1)
        x_o = _new_node(view, "Gather", [x, idx_o], f"{x.name}_outliers", axis=-1)
        *operands, nodes = _uint8_codes(view, x_n.outputs[0], q, f"{x.name}_normal")
        _insert_for_input(view, x, [x_n, x_o, *nodes])
        cache[key] = (tuple(operands), x_o.outputs[0])
    operands, xo = cache[key]
    w_name = node.inputs[1].name
    codes_kn = q.codes.numpy().astype(np.int8)[:, normal].T  # [Kn, N]
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    wo = _const(view, f"{w_name}_outlier_rows", q.fp_weight.numpy().T.astype(dtype))  # [Ko, N]
    int_nodes = _integer_matmul(view, node, op, q, operands, codes_kn)
    mm_fp = _new_node(view, "MatMul", [xo, wo], f"{op.name}_outliers")
    add = _new_node(view, "Add", [int_nodes[-1].outputs[0], mm_fp.outputs[0]], f"{op.name}_sum")
    _replace_linear(view, node, [*int_nodes, mm_fp, add])


def _lower_matmulnbits(view, node: ir.Node, op: OpRef, q: QLinear, config: OnnxLoweringConfig) -> None:
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
    model: ir.Model = view.model
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    a = _act_float(view, node, q) if q.act is not None else node.inputs[0]
    if order is not None:
        a = _permuted(view, a, order)
    w_name = node.inputs[1].name
    inputs = [
        a,
        _const(view, f"{w_name}_nbits", packed.b),
        _const(view, f"{w_name}_nbits_scales", packed.scales),
        None if packed.zero_points is None else _const(view, f"{w_name}_nbits_zp", packed.zero_points),
        None if packed.g_idx is None else _const(view, f"{w_name}_g_idx", packed.g_idx),
    ]
    while inputs[-1] is None:
        inputs.pop()
    mnb = _new_node(
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
    _replace_linear(view, node, [mnb])


def _permuted(view, a: ir.Value, order: np.ndarray) -> ir.Value:
    """a[..., order], one Gather per (activation, permutation) shared by the linears reading it."""
    key = (a.name, "gather", order.tobytes())
    cache = view.lowered_inputs
    if key not in cache:
        idx = _const(view, f"{a.name}_act_order", order.astype(np.int64))
        gather = _new_node(view, "Gather", [a, idx], f"{a.name}_act_order", axis=-1)
        _insert_for_input(view, a, [gather])
        cache[key] = gather.outputs[0]
    return cache[key]


def _lower_blocked_dq(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
    """Opset-21 DequantizeLinear(int4/uint4 or int8/uint8 [K, N], block_size along K) + MatMul.

    GPTQ act-order groups are made contiguous by permuting the input channels: the weight rows
    offline, the activation with a Gather on its last axis.
    """
    model: ir.Model = view.model
    if _opset(model) < BLOCKED_DQ_OPSET and q.group_axis == "out":
        _lower_row_groups_per_axis(view, node, op, q)
        return
    if _opset(model) < BLOCKED_DQ_OPSET:
        msg = (
            f"node '{op.name}': recipe key 'lowering.weight_op': dequantize_linear needs opset >= "
            f"{BLOCKED_DQ_OPSET} (blocked DequantizeLinear), the model has opset {_opset(model)}; "
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
    a = _act_float(view, node, q) if q.act is not None else node.inputs[0]
    if arrays.order is not None:
        a = _permuted(view, a, arrays.order)
    dq_inputs = [
        _const(view, f"{w_name}_quantized", arrays.codes),
        _const(view, f"{w_name}_scale", arrays.scales),
    ]
    if arrays.zero_points is not None:
        dq_inputs.append(_const(view, f"{w_name}_zero_point", arrays.zero_points))
    # blocks along K (axis 0 of [K, N]); per output channel: one scale per column (axis 1)
    attrs = (
        {"axis": 1} if arrays.block_size is None else {"axis": arrays.axis, "block_size": arrays.block_size}
    )
    dq = _new_node(view, "DequantizeLinear", dq_inputs, f"{op.name}_weight_dq", **attrs)
    mm = _new_node(view, "MatMul", [a, dq.outputs[0]], f"{op.name}_matmul")
    _replace_linear(view, node, [*nodes, dq, mm])


def _lower_row_groups_per_axis(view, node: ir.Node, op: OpRef, q: QLinear) -> None:
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
    dq_inputs = [_const(view, f"{w_name}_quantized", codes), _const(view, f"{w_name}_scale", scales)]
    if not signed:
        zp = np.ascontiguousarray(q.zero_points.numpy().T).astype(dtype).reshape(-1)
        dq_inputs.append(_const(view, f"{w_name}_zero_point", zp))
    dq = _new_node(view, "DequantizeLinear", dq_inputs, f"{op.name}_weight_dq", axis=0)
    shape = _const(view, f"{w_name}_shape", np.asarray([k, n], np.int64))
    kn = _new_node(view, "Reshape", [dq.outputs[0], shape], f"{op.name}_weight")
    a = _act_float(view, node, q) if q.act is not None else node.inputs[0]
    mm = _new_node(view, "MatMul", [a, kn.outputs[0]], f"{op.name}_matmul")
    _replace_linear(view, node, [dq, kn, mm])
