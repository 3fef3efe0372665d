"""ONNX lowering of the float and block formats (FP8, MX, NVFP4, BFP), run by stock onnxruntime.

Weights (`lower_block_weight`): the element codes and the block scales are initializers in their
own widths and a `qpass`-domain function op decodes them in the graph:
`qpass.Dequantize<FMT>(codes [K, N], scale_codes [K/B, N] (, tensor_scale)) -> W [K, N]` is a
Gather on the element's value table (integers: a Cast) times the block scale (a Gather on the
256-entry E8M0 or E4M3 table, NVFP4 times its float32 tensor scale), repeated over each block of B
input channels. The tables are `qpass.formats`' own, so W equals the torch reference bit for bit.
Storage: FP4 codes and 4-bit BFP mantissas two per byte, FP6/FP8/INT8 one byte each
(ONNX has no 6-bit type), one byte of scale per block. The onnxscript optimizer does not fold a
custom-domain op, so the file keeps the codes; ONNX Runtime inlines the body and constant-folds it
when the session is created, so at run time the linear is a float32 MatMul. The standard-op form
(`lowering: {weight_op: dequantize_linear}`) exists where ONNX Runtime's CPU DequantizeLinear takes
the types: FP8 E4M3/E5M2 per channel, MXFP8 (opset 21 blocks, float32 scales), MXINT8/BFP16 (int8)
and BFP12 (int4). ORT does not fold DequantizeLinear, so it dequantizes on every run: 28x slower
than the function op at batch 1 on a 1536x1536 weight, 1.3x at 512 rows (measured on this machine,
ORT 1.32). ORT 1.32's CPU provider has no FLOAT4E2M1 DequantizeLinear or Cast, and takes float
scales only (no FLOAT8E8M0 / FLOAT8E4M3FN scale input): FP4, FP6 and NVFP4 have no DQ form.

Activations (`block_fake_quant`): `qpass.FakeQuant<FMT>(x) -> y`, the format's own dynamic
quantize-dequantize over the last axis in float, the arithmetic of `qpass.formats.fake_quantize`:
block absmax; E8M0 scale 2^clamp(floor(log2 amax) - emax_elem, -127, 127) (integers: times
2^-(bits-2)); NVFP4 tensor scale amax/(6*448) and E4M3-rounded block scales; FP8 one float32
scale per token; elements rounded to nearest-even on the format's grid by exponent arithmetic
(floor(log2) from Log, corrected against an exact power-of-two table, so it is exact). Simulated:
ONNX Runtime's CPU provider has no MX/FP8 GEMM, so the quantized activation is dequantized again and
the MatMul runs in float32. NaN/Inf inputs are not reproduced (the reference gives NaN scales).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from qpass.errors import UnsupportedOpError
from qpass.formats import ElementType, Granularity, ScaleType, element_values
from qpass.formats.elements import encode_float
from qpass.formats.scales import FP8_E4M3_MAX, int_unit
from qpass.lowering.onnx_block_functions import (
    dequantize_function,
    fake_quant_function,
    format_tag,
    register_function,
)
from qpass.lowering.onnx_nodes import BLOCKED_DQ_OPSET, QPASS_DOMAIN, model_opset
from qpass.qconfig import OnnxLoweringConfig, WeightOp
from qpass.quant.qlinear import QLinear, dynamic_spec

FP8_DQ_OPSET = 19  # DequantizeLinear on FLOAT8E4M3FN / FLOAT8E5M2


# ------------------------------------------------------------------------------ initializers


def _code_array(q: QLinear) -> np.ndarray:
    """Codes [K, N]: one byte each, or for <= 4 bits uint8 [K/2, N] with row k in the low and row
    k + K/2 in the high nibble (opset-independent: INT4/UINT4 need opset 21 for Cast).
    """
    et = q.spec.element
    codes = q.codes.numpy().T  # [out, in] -> [K, N]
    if et.bits <= 4:
        u = codes.astype(np.int8).view(np.uint8) & 0xF if not et.is_float else codes.astype(np.uint8)
        half = u.shape[0] // 2
        return (u[:half] | (u[half:] << 4)).astype(np.uint8)
    return codes.astype(np.uint8) if et.is_float else codes.astype(np.int8)


def _e8m0_bytes(scales: np.ndarray, unit: float) -> np.ndarray | None:
    """The E8M0 bytes b with 2^(b-127) * unit == scales exactly, or None."""
    v = scales.astype(np.float64) / unit
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        return None
    mant, exp = np.frexp(v)
    byte = exp.astype(np.int64) - 1 + 127
    if np.any(mant != 0.5) or np.any(byte < 0) or np.any(byte > 254):
        return None
    return byte.astype(np.uint8)


def _e4m3_bytes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(E4M3 bytes, float32 tensor scale ts) with e4m3(bytes) * ts == scales exactly, or None.

    The block with the tensor's absmax has the E4M3 maximum 448, so ts is max(scales) / 448 up to
    rounding: that value and its float32 neighbours are tried and the first exact one is kept.
    """
    s = torch.from_numpy(np.ascontiguousarray(scales, np.float32))
    top = float(s.max()) if s.numel() else 0.0
    if not math.isfinite(top) or bool((s < 0).any()):
        return None
    base = np.float32(top / FP8_E4M3_MAX) if top > 0 else np.float32(1.0)
    candidates = [base]
    for direction in (np.inf, -np.inf):
        c = base
        for _ in range(4):
            c = np.nextafter(c, np.float32(direction))
            candidates.append(c)
    table = element_values(ElementType.FP8_E4M3)
    for ts in candidates:
        if not ts > 0:
            continue
        t = torch.tensor(float(ts), dtype=torch.float32)
        bits = encode_float(s / t, ElementType.FP8_E4M3)
        if torch.equal(table[bits.to(torch.int64)] * t, s):
            return bits.numpy(), np.asarray(ts, np.float32)
    return None


# ------------------------------------------------------------------------------ lowering


def block_fake_quant(view, x: ir.Value, q: QLinear) -> tuple[ir.Value, list[ir.Node]]:
    """The `qpass.FakeQuant<FMT>` node for activation x (the caller inserts and caches it)."""
    spec = dynamic_spec(q.act)
    model: ir.Model = view.model
    name = register_function(model, fake_quant_function(spec, model_opset(model)))
    node = ir.node(name, [x], domain=QPASS_DOMAIN, name=view.fresh_name(f"{x.name}_{name}"))
    node.outputs[0].name = view.fresh_name(f"{x.name}_fq")
    return node.outputs[0], [node]


def lower_block_weight(
    view, node: ir.Node, op, q: QLinear, a: ir.Value, config: OnnxLoweringConfig
) -> list[ir.Node]:
    """The new nodes computing `a @ W` for a float/block-format weight (the caller swaps them in)."""
    spec = q.spec
    w_name = node.inputs[1].name
    if config.weight_op is WeightOp.MATMULNBITS:
        msg = (
            f"node '{op.name}': recipe key 'lowering.weight_op': matmulnbits takes integer weights, "
            f"not {format_tag(spec)}; use auto (qpass function op) or dequantize_linear"
        )
        raise UnsupportedOpError(msg)
    if config.weight_op is WeightOp.DEQUANTIZE_LINEAR:
        w = _dequantize_linear(view, op, q, w_name)
        nodes = [w.producer()]
    else:
        w, nodes = _function_weight(view, q, w_name)
    mm = ir.node("MatMul", [a, w], name=view.fresh_name(f"{op.name}_matmul"))
    mm.outputs[0].name = view.fresh_name(f"{op.name}_matmul_out")
    return [*nodes, mm]


def _function_weight(view, q: QLinear, w_name: str) -> tuple[ir.Value, list[ir.Node]]:
    model: ir.Model = view.model
    spec = q.spec
    scales = q.scales.numpy().astype(np.float32)  # [out, groups]
    inputs = [view.add_initializer(f"{w_name}_codes", _code_array(q))]
    kind = "float"
    if spec.scale_type is ScaleType.E8M0:
        unit = 1.0 if spec.element.is_float else int_unit(spec.element)
        byte = _e8m0_bytes(scales, unit)
        if byte is not None:
            kind, scales = "e8m0", byte
    elif spec.scale_type is ScaleType.E4M3:
        found = _e4m3_bytes(scales)
        if found is not None:
            kind, scales = "e4m3", found[0]
    if spec.granularity is Granularity.PER_GROUP:
        inputs.append(view.add_initializer(f"{w_name}_scale_codes", np.ascontiguousarray(scales.T)))
    else:
        inputs.append(view.add_initializer(f"{w_name}_scale", np.ascontiguousarray(scales[:, 0])))
    if kind == "e4m3":
        inputs.append(view.add_initializer(f"{w_name}_tensor_scale", found[1]))
    name = register_function(model, dequantize_function(spec, kind, model_opset(model)))
    node = ir.node(name, inputs, domain=QPASS_DOMAIN, name=view.fresh_name(f"{w_name}_{name}"))
    node.outputs[0].name = view.fresh_name(f"{w_name}_dequantized")
    return node.outputs[0], [node]


def _dequantize_linear(view, op, q: QLinear, w_name: str) -> ir.Value:
    """Standard DequantizeLinear where ONNX Runtime's CPU kernel takes the types (see module doc)."""
    model: ir.Model = view.model
    spec, et = q.spec, q.spec.element
    opset = model_opset(model)
    per_channel = spec.granularity is not Granularity.PER_GROUP
    need = FP8_DQ_OPSET if per_channel else BLOCKED_DQ_OPSET
    fp8 = {ElementType.FP8_E4M3: ml_dtypes.float8_e4m3fn, ElementType.FP8_E5M2: ml_dtypes.float8_e5m2}
    ints = {8: np.int8, 4: ml_dtypes.int4}
    if et not in fp8 and (et.is_float or et.bits not in ints):
        msg = (
            f"node '{op.name}': recipe key 'lowering.weight_op': dequantize_linear has no {format_tag(spec)} "
            "form in ONNX Runtime (CPU DequantizeLinear takes FP8, int8 and int4 elements only); use auto"
        )
        raise UnsupportedOpError(msg)
    if opset < need:
        msg = (
            f"node '{op.name}': recipe key 'lowering.weight_op': dequantize_linear of {format_tag(spec)} "
            f"needs opset >= {need}, the model has opset {opset}; export at opset {need} or use auto"
        )
        raise UnsupportedOpError(msg)
    codes = q.codes.numpy().T
    arr = codes.astype(np.uint8).view(fp8[et]) if et.is_float else codes.astype(ints[et.bits])
    model.ir_version = max(model.ir_version or 0, 10)
    scales = q.scales.numpy().astype(np.float32)
    inputs = [view.add_initializer(f"{w_name}_quantized", np.ascontiguousarray(arr))]
    if per_channel:
        inputs.append(view.add_initializer(f"{w_name}_scale", np.ascontiguousarray(scales[:, 0])))
        attrs = {"axis": 1}
    else:
        inputs.append(view.add_initializer(f"{w_name}_scale", np.ascontiguousarray(scales.T)))
        attrs = {"axis": 0, "block_size": spec.group_size}
    node = ir.node("DequantizeLinear", inputs, attributes=attrs, name=view.fresh_name(f"{op.name}_weight_dq"))
    node.outputs[0].name = view.fresh_name(f"{w_name}_dequantized")
    return node.outputs[0]
