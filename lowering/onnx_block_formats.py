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
from qpass.formats import ElementType, Granularity, QuantSpec, ScaleType, decode_e8m0, element_values
from qpass.formats.elements import encode_float
from qpass.formats.scales import FP8_E4M3_MAX, int_unit
from qpass.qconfig import OnnxLoweringConfig, WeightOp
from qpass.quant.qlinear import QLinear, dynamic_spec

DOMAIN = "qpass"
FP8_DQ_OPSET = 19  # DequantizeLinear on FLOAT8E4M3FN / FLOAT8E5M2
BLOCKED_DQ_OPSET = 21  # DequantizeLinear with block_size, int4
WHERE_CHAIN_MAX = 4  # element rounding: exponent by a Where chain up to this many thresholds


# ------------------------------------------------------------------------------ names


_ELEMENT_TAG = {
    ElementType.FP8_E4M3: "FP8E4M3",
    ElementType.FP8_E5M2: "FP8E5M2",
    ElementType.FP6_E3M2: "FP6E3M2",
    ElementType.FP6_E2M3: "FP6E2M3",
    ElementType.FP4_E2M1: "FP4",
}


def format_tag(spec: QuantSpec) -> str:
    """The recipe name of a spec, upper case, for op names: MXFP4, MXFP8E5M2, NVFP4, BFP12, FP8E4M3."""
    et = spec.element
    elem = _ELEMENT_TAG.get(et, et.value.upper())
    if spec.scale_type is ScaleType.E4M3:
        return f"NV{elem}"
    if spec.scale_type is ScaleType.E8M0:
        if not et.is_float and spec.group_size != 32:
            return f"BFP{et.bits + 8}" + ("" if spec.group_size == 8 else f"B{spec.group_size}")
        elem = "FP8" if et is ElementType.FP8_E4M3 else elem
        return f"MX{elem}" + ("" if spec.group_size == 32 else f"B{spec.group_size}")
    if spec.granularity is Granularity.PER_GROUP:
        return f"{elem}G{spec.group_size}"
    return elem


# ------------------------------------------------------------------------------ function bodies


class _Body:
    """Nodes of one function body, built against the model's opset (functions must match it)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        i = len(self.nodes)
        node = ir.node(op_type, list(inputs), attributes=attrs or None, name=f"n{i}")
        node.outputs[0].name = f"v{i}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        i = len(self.nodes)
        arr = np.ascontiguousarray(array)
        node = ir.node("Constant", [], attributes={"value": ir.tensor(arr, name=f"c{i}")}, name=f"c{i}")
        node.outputs[0].name = f"c{i}"
        self.nodes.append(node)
        return node.outputs[0]

    def scalar(self, v: float) -> ir.Value:
        return self.const(np.asarray(v, np.float32))

    def int64s(self, *v: int) -> ir.Value:
        return self.const(np.asarray(v, np.int64))

    def reduce_max(self, x: ir.Value, axes: list[int] | None, keepdims: int) -> ir.Value:
        if axes is None:
            return self.op("ReduceMax", x, keepdims=keepdims)
        if self.opset >= 18:
            return self.op("ReduceMax", x, self.int64s(*axes), keepdims=keepdims)
        return self.op("ReduceMax", x, keepdims=keepdims, axes=axes)

    def lookup(self, table: np.ndarray, index: ir.Value) -> ir.Value:
        """table[index] for an integral float or integer index tensor."""
        idx = self.op("Cast", index, to=ir.DataType.INT32)
        return self.op("Gather", self.const(table.astype(np.float32)), idx, axis=0)

    def floor_log2(self, a: ir.Value, lo: int, hi: int) -> ir.Value:
        """floor(log2(a)) as an integral float for a > 0, exact where it lies in [lo, hi]; below lo
        it gives lo - 1 or lo, above hi it gives hi or hi + 1 (callers clamp).

        Log is rounded, so its floor can be one off next to a power of two: it is compared with the
        exact 2^e (a table) and moved by one where needed.
        """
        e = self.op("Floor", self.op("Mul", self.op("Log", a), self.scalar(1.0 / math.log(2.0))))
        e = self.op("Clip", e, self.scalar(lo), self.scalar(hi))
        with np.errstate(over="ignore"):  # 2^e, inf above 2^127 (never reached by a finite a)
            table = np.ldexp(np.float64(1.0), np.arange(lo, hi + 1)).astype(np.float32)
        p = self.lookup(table, self.op("Sub", e, self.scalar(lo)))
        down = self.op("Cast", self.op("Greater", p, a), to=ir.DataType.FLOAT)
        up = self.op(
            "Cast", self.op("LessOrEqual", self.op("Mul", p, self.scalar(2.0)), a), to=ir.DataType.FLOAT
        )
        return self.op("Add", self.op("Sub", e, down), up)

    def round_float(self, y: ir.Value, et: ElementType) -> ir.Value:
        """Round y to the nearest value of minifloat `et` (ties to even, saturating), as
        `qpass.formats.elements.round_to_float`: with e = floor(log2(max(|y|, 2^emin))),
        k = round(|y| 2^(m-e)) and the value is k / 2^(m-e) (both scalings exact).

        2^(m-e) comes from a chain of Where over the exponent thresholds when the format has
        at most `WHERE_CHAIN_MAX` + 1 exponents (FP4, FP6 E2M3: 1.7x faster than Log, measured), else
        from floor_log2 and a table (FP8).
        """
        from qpass.formats.elements import _FLOAT_LAYOUTS

        lay = _FLOAT_LAYOUTS[et]
        emin, emax, m = 1 - lay.bias, et.emax, lay.mbits
        a = self.op("Min", self.op("Abs", y), self.scalar(et.max_value))
        if emax - emin <= WHERE_CHAIN_MAX:
            up = self.scalar(2.0 ** (m - emin))
            for j in range(emin + 1, emax + 1):
                up = self.op(
                    "Where",
                    self.op("GreaterOrEqual", a, self.scalar(2.0**j)),
                    self.scalar(2.0 ** (m - j)),
                    up,
                )
        else:
            e = self.floor_log2(self.op("Max", a, self.scalar(2.0**emin)), emin, emax)
            exps = np.arange(emin, emax + 1)
            up = self.lookup(np.ldexp(np.float64(1.0), m - exps), self.op("Sub", e, self.scalar(emin)))
        mag = self.op("Div", self.op("Round", self.op("Mul", a, up)), up)
        return self.op("Mul", mag, self.op("Sign", y))  # -0.0 gives +0.0: equal values

    def round_elements(self, y: ir.Value, et: ElementType) -> ir.Value:
        if et.is_float:
            return self.round_float(y, et)
        q = et.max_value
        return self.op("Clip", self.op("Round", y), self.scalar(-q), self.scalar(q))

    def function(self, name: str, inputs: list[ir.Value], out: ir.Value) -> ir.Function:
        out.name = "y"
        graph = ir.Graph(inputs, [out], nodes=self.nodes, opset_imports={"": self.opset}, name=name)
        return ir.Function(DOMAIN, name, graph=graph, attributes=[])


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _register(model: ir.Model, function: ir.Function) -> str:
    key = (DOMAIN, function.name, "")
    if key not in model.functions:
        model.functions[key] = function
    model.opset_imports.setdefault(DOMAIN, 1)
    return function.name


def fake_quant_function(spec: QuantSpec, opset: int) -> ir.Function:
    """`qpass.FakeQuant<FMT>(x) -> y`: dynamic quantize-dequantize of x in `spec` over its last axis.

    `spec` is `qpass.quant.qlinear.dynamic_spec` of the activation config: per token with a float32
    scale (FP8), or blocks of the last axis with E8M0 (MX, BFP) or E4M3 x float32 (NVFP4) scales.
    """
    b = _Body(opset)
    x = ir.Value(name="x")
    et = spec.element
    if spec.scale_type is ScaleType.FLOAT32:  # per token: absmax / max_value, zero rows -> 1
        amax = b.reduce_max(b.op("Abs", x), [-1], 1)
        s = b.op("Div", amax, b.scalar(et.max_value))
        s = b.op("Where", b.op("Equal", s, b.scalar(0.0)), b.scalar(1.0), s)
        out = b.op("Mul", b.round_elements(b.op("Div", x, s), et), s)
        return b.function(f"FakeQuant{format_tag(spec)}", [x], out)
    shape = b.op("Shape", x)
    rows = b.op("Reshape", x, b.int64s(-1, spec.group_size))
    amax = b.reduce_max(b.op("Abs", rows), [-1], 1)
    if spec.scale_type is ScaleType.E8M0:
        emax = et.emax
        f = b.floor_log2(amax, emax - 128, emax + 128)
        exp = b.op("Clip", b.op("Sub", f, b.scalar(emax)), b.scalar(-127.0), b.scalar(127.0))
        unit = 1.0 if et.is_float else int_unit(et)
        table = decode_e8m0(torch.arange(255)).numpy().astype(np.float64) * unit
        s = b.lookup(table, b.op("Add", exp, b.scalar(127.0)))
        out = b.op("Mul", b.round_elements(b.op("Div", rows, s), et), s)
    else:  # NVFP4: tensor scale amax/(emax*448), E4M3 block scales; blocks whose scale is 0 give 0
        emax_val = et.max_value
        ts = b.op("Div", b.reduce_max(amax, None, 0), b.scalar(emax_val * FP8_E4M3_MAX))
        ts = b.op("Where", b.op("Equal", ts, b.scalar(0.0)), b.scalar(1.0), ts)
        block = b.round_float(b.op("Div", amax, b.op("Mul", b.scalar(emax_val), ts)), ElementType.FP8_E4M3)
        s = b.op("Mul", block, ts)
        zero = b.op("Equal", s, b.scalar(0.0))
        div = b.op("Where", zero, b.scalar(1.0), s)
        out = b.op("Mul", b.round_elements(b.op("Div", rows, div), et), div)
        out = b.op("Where", zero, b.scalar(0.0), out)
    out = b.op("Reshape", out, shape)
    return b.function(f"FakeQuant{format_tag(spec)}", [x], out)


def dequantize_function(spec: QuantSpec, scale_kind: str, opset: int) -> ir.Function:
    """`qpass.Dequantize<FMT>(codes [K, N], scales (, tensor_scale)) -> W [K, N]` (see module doc).

    scale_kind: "e8m0" (one byte per block), "e4m3" (one E4M3 byte per block, then a float32
    tensor_scale input) or "float" (float32 [K/B, N] blocks, or [N] per channel).
    """
    b = _Body(opset)
    codes, scales = ir.Value(name="codes"), ir.Value(name="scales")
    inputs = [codes, scales]
    et = spec.element
    if et.bits <= 4:  # two codes a byte: rows k and k + K/2 in the low and high nibble
        c = b.op("Cast", codes, to=ir.DataType.INT32)
        hi = b.op("Div", c, b.const(np.asarray(16, np.int32)))
        lo = b.op("Sub", c, b.op("Mul", hi, b.const(np.asarray(16, np.int32))))
        table = element_values(et).numpy()
        values = b.op("Concat", b.lookup(table, lo), b.lookup(table, hi), axis=0)
    elif et.is_float:
        values = b.lookup(element_values(et).numpy(), codes)
    else:
        values = b.op("Cast", codes, to=ir.DataType.FLOAT)
    if scale_kind == "e8m0":
        unit = 1.0 if et.is_float else int_unit(et)
        s = b.lookup(decode_e8m0(torch.arange(256)).numpy().astype(np.float64) * unit, scales)
    elif scale_kind == "e4m3":
        tensor_scale = ir.Value(name="tensor_scale")
        inputs.append(tensor_scale)
        s = b.op("Mul", b.lookup(element_values(ElementType.FP8_E4M3).numpy(), scales), tensor_scale)
    else:
        s = scales
    if spec.granularity is Granularity.PER_GROUP:  # [K/B, N] -> [K/B, B, N] -> [K, N]
        s = b.op("Unsqueeze", s, b.int64s(1))
        s = b.op("Expand", s, b.int64s(1, spec.group_size, 1))
        s = b.op("Reshape", s, b.op("Shape", values))
    out = b.op("Mul", values, s)
    suffix = "" if scale_kind != "float" or spec.scale_type is ScaleType.FLOAT32 else "F32Scales"
    return b.function(f"Dequantize{format_tag(spec)}{suffix}", inputs, out)


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
    name = _register(model, fake_quant_function(spec, _opset(model)))
    node = ir.node(name, [x], domain=DOMAIN, name=view.fresh_name(f"{x.name}_{name}"))
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
    name = _register(model, dequantize_function(spec, kind, _opset(model)))
    node = ir.node(name, inputs, domain=DOMAIN, name=view.fresh_name(f"{w_name}_{name}"))
    node.outputs[0].name = view.fresh_name(f"{w_name}_dequantized")
    return node.outputs[0], [node]


def _dequantize_linear(view, op, q: QLinear, w_name: str) -> ir.Value:
    """Standard DequantizeLinear where ONNX Runtime's CPU kernel takes the types (see module doc)."""
    model: ir.Model = view.model
    spec, et = q.spec, q.spec.element
    opset = _opset(model)
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
