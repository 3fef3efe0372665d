"""The `qpass`-domain ONNX functions that decode the float and block formats (FP8, MX, NVFP4, BFP):
`qpass.Dequantize<FMT>` for weights and `qpass.FakeQuant<FMT>` for activations, built node by node
against the model's opset from `qpass.formats`' own value tables, so they match the torch
reference bit for bit. `onnx_block_formats` decides where they are used; this module only builds
them (see that module for the arithmetic and the measurements behind the choice of forms).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from qpass.formats import ElementType, Granularity, QuantSpec, ScaleType, decode_e8m0, element_values
from qpass.formats.scales import FP8_E4M3_MAX, int_unit
from qpass.lowering.onnx_nodes import QPASS_DOMAIN

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
        return ir.Function(QPASS_DOMAIN, name, graph=graph, attributes=[])


def register_function(model: ir.Model, function: ir.Function) -> str:
    """Add `function` to the model once (by name) and import the qpass domain; returns its op name."""
    key = (QPASS_DOMAIN, function.name, "")
    if key not in model.functions:
        model.functions[key] = function
    model.opset_imports.setdefault(QPASS_DOMAIN, 1)
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
