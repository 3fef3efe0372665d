"""Quantization of linear layers: plan per-layer quantized forms from calibration statistics.

Weights: INTn per output channel or per group of input channels, symmetric (narrow range,
zero point 0: INT8 codes in [-127, 127]) or asymmetric (unsigned codes with a zero point).
Activations (linear inputs only; the residual stream is left in float): INTn per tensor
static from calibrated ranges (unsigned with a zero point, or symmetric), or per token dynamic.
The result is a list of `QLinear` that lowering turns into backend ops. Conv layers take the same
path on their [out, in/groups * k...] weight view (`qpass.quant.conv`), and every quantizable op
left in float gets a report line with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qpass.calibration import StatKind, StatRequest, Stats
from qpass.formats import ElementType, Granularity, QuantSpec, ScaleType, get_format
from qpass.formats.quantize import code_values
from qpass.graph.edits import EditPlan, SiteNote
from qpass.graph.refs import OpKind, OpRef, WeightRef
from qpass.graph.view import GraphView, iter_quantizable_ops
from qpass.qconfig import (
    ActGranularity,
    ActivationQuantConfig,
    WeightQuantConfig,
    format_bits,
    is_block_format,
)
from qpass.quant.selection import LayerSelection, Selector
from qpass.quant.weight_quant import LayerWeight, quantize_weight


def canonical_weight(weight: torch.Tensor, ref: WeightRef) -> torch.Tensor:
    """The weight as [out, in] float32, whatever its stored layout."""
    w = weight.to(torch.float32)
    if w.dim() != 2:
        w = w.movedim(ref.out_axis, 0).reshape(w.shape[ref.out_axis], -1)
        return w
    return w if ref.out_axis == 0 else w.T


def weight_spec(cfg: WeightQuantConfig) -> QuantSpec:
    """The formats spec of a weight config, for [out, in] weights."""
    if is_block_format(cfg.format):  # blocks run along the input channels (the reduction axis)
        spec = get_format(cfg.format)
        return spec.replace(axis=0 if spec.granularity is Granularity.PER_CHANNEL else -1)
    kw = {"symmetric": cfg.symmetric, "float_zero_point": cfg.float_zero_point}
    if cfg.group is None:
        return QuantSpec(ElementType(cfg.format), Granularity.PER_CHANNEL, axis=0, **kw)
    return QuantSpec(ElementType(cfg.format), Granularity.PER_GROUP, axis=-1, group_size=cfg.group, **kw)


def fake_quant_weight(w_out_in: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    return weight_spec(cfg).fake_quantize(w_out_in)


@dataclass(frozen=True)
class ActQParams:
    """Static per-tensor activation parameters: x ~ (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def act_qparams(lo: float, hi: float, cfg: ActivationQuantConfig) -> ActQParams:
    """Per-tensor INTn parameters from a calibrated range (zero is always representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    bits = format_bits(cfg.format)
    if cfg.symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = max(abs(lo), abs(hi))
        scale = amax / qmax if amax > 0 else 1.0
        return ActQParams(scale, 0, -qmax, qmax)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zp = int(min(max(round(-lo / scale), 0), qmax))
    return ActQParams(scale, zp, 0, qmax)


def fake_quant_static(x: torch.Tensor, qp: ActQParams) -> torch.Tensor:
    q = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
    return (q - qp.zero_point) * qp.scale


def dynamic_spec(cfg: ActivationQuantConfig) -> QuantSpec:
    """Per-token symmetric INTn (or the block format's own blocks along channels), computed at run time."""
    if is_block_format(cfg.format):
        spec = get_format(cfg.format)
        if spec.granularity is Granularity.PER_CHANNEL:  # fp8 with one float32 scale: per token
            return spec.replace(granularity=Granularity.PER_TOKEN)
        return spec.replace(axis=-1)
    return QuantSpec(ElementType(cfg.format), Granularity.PER_TOKEN, symmetric=True)


def fake_quant_act(x: torch.Tensor, cfg: ActivationQuantConfig, qp: ActQParams | None) -> torch.Tensor:
    if cfg.dynamic or cfg.granularity is ActGranularity.PER_TOKEN:
        if cfg.granularity is ActGranularity.PER_TOKEN or is_block_format(cfg.format):
            return dynamic_spec(cfg).fake_quantize(x)
        flat = x.reshape(1, -1)
        return dynamic_spec(cfg).fake_quantize(flat).reshape(x.shape)
    assert qp is not None
    return fake_quant_static(x, qp)


def quantized_output_error(
    x: torch.Tensor,
    w_out_in: torch.Tensor,
    s: torch.Tensor,
    wcfg: WeightQuantConfig,
    acfg: ActivationQuantConfig,
    act_range: tuple[float, float],
    ref: torch.Tensor | None = None,
) -> float:
    """Relative squared error of (x/s) @ (w*s)^T under quantization vs the FP x @ w^T (= `ref`)."""
    if ref is None:
        ref = x @ w_out_in.T
    xs = x / s
    qp = act_qparams(act_range[0], act_range[1], acfg)
    out = fake_quant_act(xs, acfg, qp) @ fake_quant_weight(w_out_in * s, wcfg).T
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


@dataclass
class QLinear:
    """A linear layer's quantized form, backend-neutral: what lowering needs.

    value = (codes - zero_points) * scales, with scales/zero points [out, groups] repeated over
    each group of `group_size` input channels (one group: per output channel).
    """

    weight: WeightRef
    codes: torch.Tensor | None  # int8 (symmetric) or uint8 (asymmetric) [out, in]; None: weight kept float
    scales: torch.Tensor | None  # float32 [out, groups]
    zero_points: torch.Tensor | None  # [out, groups] or None (symmetric)
    g_idx: torch.Tensor | None  # group of each input channel (GPTQ act-order); None: contiguous groups
    group_size: int | None  # None: per output channel
    bits: int
    act: ActivationQuantConfig | None
    act_qparams: ActQParams | None  # static per-tensor only
    spec: QuantSpec | None = None  # the weight format; float elements store bit-pattern codes
    lorc_u: torch.Tensor | None = None  # low-rank compensation U [out, r] (W ~ dequant + U @ V)
    lorc_v: torch.Tensor | None = None  # V [r, in]
    outlier_rows: torch.Tensor | None = None  # protected weights kept in float: int64 [k] rows,
    outlier_cols: torch.Tensor | None = None  # int64 [k] input channels,
    outlier_values: torch.Tensor | None = None  # float32 [k] values (their codes are the zero code)
    fp_channels: torch.Tensor | None = None  # LLM.int8 decomposition: input channels kept float (int64 [k]),
    fp_weight: torch.Tensor | None = None  # their weight columns, float32 [out, k] (codes there are 0)
    tensor_scale: float | None = None  # NVFP4's second-level scale (scales include it)
    group_axis: str = "in"  # "out" (AdaDim): groups of output rows, scales/zero points [out_groups, in]
    # Conv: the stored weight shape [out, in/groups, k...] (codes are its [out, in/groups * k...] view)
    conv_shape: tuple[int, ...] | None = None
    out_qparams: ActQParams | None = None  # Conv W8A8 static: the output's Q/DQ (ORT fuses QLinearConv)

    @property
    def is_conv(self) -> bool:
        return self.conv_shape is not None

    @property
    def has_corrections(self) -> bool:
        """A low-rank or sparse float term on top of the quantized weight."""
        return self.lorc_u is not None or self.outlier_values is not None

    def effective_weight(self) -> torch.Tensor:
        """float32 [out, in]: dequantized weight + kept (protected) weights + U @ V."""
        w = self.dequantized_weight().clone()
        if self.outlier_values is not None:
            w[self.outlier_rows, self.outlier_cols] += self.outlier_values
        if self.lorc_u is not None:
            w = w + self.lorc_u @ self.lorc_v
        if self.fp_channels is not None:
            w[:, self.fp_channels] = self.fp_weight
        return w

    @property
    def per_channel(self) -> bool:
        return self.scales is not None and self.scales.shape[1] == 1

    @property
    def integer_weight(self) -> bool:
        """Plain INTn codes with float32 scales (what QDQ / MatMulNBits / INT kernels take)."""
        return self.codes is not None and (self.spec is None or not is_block_spec(self.spec))

    def dequantized_weight(self) -> torch.Tensor:
        element = None if self.spec is None else self.spec.element
        return dequantize_weight(
            self.codes, self.scales, self.zero_points, self.g_idx, element, self.group_axis, self.group_size
        )


@dataclass(frozen=True)
class ReplaceWithQOp:
    """Replace a linear op by its quantized form (what lowering does with one QLinear)."""

    op: OpRef
    qlinear: QLinear
    site: str = ""


@dataclass
class QuantPlan(EditPlan):
    """The quantize stage's result: one ReplaceWithQOp per quantized linear, plus per-layer notes.

    Not a graph edit plan: the graph views never apply it; a lowering does
    (`qpass.registry.lower`), so the graph layer never reaches up into lowering.
    """

    edits: list[ReplaceWithQOp] = field(default_factory=list)  # type: ignore[assignment]


def is_block_spec(spec: QuantSpec) -> bool:
    """Float elements or shared-exponent (E8M0/E4M3) scales: not a plain INTn weight."""
    return spec.element.is_float or spec.scale_type is not ScaleType.FLOAT32


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    g_idx: torch.Tensor | None = None,
    element: ElementType | None = None,
    group_axis: str = "in",
    group_size: int | None = None,
) -> torch.Tensor:
    """(codes - zero_points[:, g]) * scales[:, g], g the group of each input channel (`g_idx`, or
    contiguous groups of `group_size`, the last one possibly short), as ONNX Runtime's
    MatMulNBits computes it. Without `group_size` the groups are taken as equal. Float
    `element` codes are bit patterns, decoded to their values first. `group_axis` "out": the
    groups run along the output rows (scales [out_groups, in]): the same formula on the transpose.
    """
    if group_axis == "out":
        zp = None if zero_points is None else zero_points.T
        return dequantize_weight(codes.T, scales.T, zp, None, element, group_size=group_size).T
    if g_idx is None:
        group = group_size if group_size and scales.shape[1] > 1 else -(-codes.shape[1] // scales.shape[1])
        g_idx = torch.arange(codes.shape[1], device=codes.device) // group
    q = code_values(codes, element) if element is not None else codes.to(torch.float32)
    if zero_points is not None:
        q = q - zero_points.to(torch.float32)[:, g_idx]
    return q * scales[:, g_idx]


def quant_stat_requests(
    view: GraphView, acfg: ActivationQuantConfig | None, wcfg: WeightQuantConfig | None = None
) -> list[StatRequest]:
    """Static activations need each linear input's range; GPTQ needs its X^T X (the layer Hessian)."""
    kinds = set()
    if acfg is not None and not acfg.dynamic:
        kinds.add(StatKind.RANGE)
    if wcfg is not None and wcfg.needs_hessian:
        kinds.add(StatKind.XTX)
    if not kinds:
        return []
    from qpass.quant.conv import conv_output_values

    ops = list(iter_quantizable_ops(view))
    requests = dict.fromkeys(view.linear_input(op) for op in ops if op.kind is OpKind.LINEAR)
    out = [StatRequest(v, frozenset(kinds)) for v in requests]
    if StatKind.RANGE in kinds:  # conv: per-tensor ranges of inputs and outputs (no X^T X: see conv.py)
        convs = [view.linear_input(op) for op in ops if op.kind is OpKind.CONV]
        out += [StatRequest(v) for v in dict.fromkeys([*convs, *conv_output_values(view, acfg)])]
    return out


def plan_quantization(
    view: GraphView,
    stats: Stats,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
    batches: Sequence[Any] | None = None,
    selection: LayerSelection | None = None,
    ops: set[str] | None = None,
) -> QuantPlan:
    """One ReplaceWithQOp per quantizable linear (of `ops` only, if given: one pipeline block); skipped layers say why.

    With `wcfg.mixed`, each layer's format is chosen first (`qpass.quant.mixed_formats.choose_formats`,
    which measures sensitivity on `batches`) and the choice is reported per layer.
    """
    plan = QuantPlan("quantize")
    chosen: dict[str, tuple[WeightQuantConfig, LayerWeight]] = {}
    if wcfg is not None and wcfg.mixed is not None:
        from qpass.quant.mixed_formats import choose_formats

        chosen, notes = choose_formats(view, stats, wcfg, batches)
        plan.notes.extend(notes)
    selector = Selector(view, selection) if selection else None
    from qpass.quant.conv import conv_skip_reason, describe_conv, plan_conv, unquantized_notes

    planned: set[str] = set()
    for op in (o for o in iter_quantizable_ops(view) if ops is None or o.name in ops):
        planned.add(op.name)
        reason = selector.skip_reason(op) if selector else None
        if reason is not None:
            plan.notes.append(SiteNote(op.name, False, reason))
            continue
        ref = view.weight(op)
        assert ref is not None
        if op.kind is OpKind.CONV:
            reason = conv_skip_reason(wcfg, acfg)
            if reason is not None:
                plan.notes.append(SiteNote(op.name, False, f"{op.op_type}: {reason}; left in float"))
                continue
            qlinear = plan_conv(view, op, ref, stats, wcfg, acfg)
            plan.edits.append(ReplaceWithQOp(op, qlinear, site=op.name))
            plan.notes.append(SiteNote(op.name, True, describe_conv(qlinear, _describe(qlinear))))
            continue
        if len(ref.const.shape) != 2:
            plan.notes.append(
                SiteNote(
                    op.name,
                    False,
                    f"{op.op_type} with a {len(ref.const.shape)}-D weight is not lowered; left in float",
                )
            )
            continue
        fp_channels = view.float_channels(op)
        if fp_channels is not None:  # int8_decompose chose float input channels for this layer
            from qpass.quant.decompose import decomposed_qlinear

            qlinear = decomposed_qlinear(view, op, ref, stats, wcfg, acfg, fp_channels)
        else:
            qlinear = _quantize_linear(view, op, ref, stats, wcfg, acfg, chosen.get(op.name))
        plan.edits.append(ReplaceWithQOp(op, qlinear, site=op.name))
        plan.notes.append(SiteNote(op.name, True, _describe(qlinear)))
    plan.notes.extend(unquantized_notes(view, planned) if ops is None else [])
    return plan


def _quantize_linear(
    view: GraphView,
    op: OpRef,
    ref: WeightRef,
    stats: Stats,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
    chosen: tuple[WeightQuantConfig, LayerWeight] | None = None,
) -> QLinear:
    """`chosen` is a mixed-precision choice: (the layer's weight config, its already quantized weight)."""
    w = canonical_weight(view.read(ref.const), ref)
    codes = scales = zeros = g_idx = None
    lw = None
    if chosen is not None:
        wcfg, lw = chosen
    if wcfg is not None:
        spec = weight_spec(wcfg)
        if lw is None:
            xtx = stats[view.linear_input(op)].xtx if wcfg.needs_hessian else None
            lw = quantize_weight(w, wcfg, spec, xtx, layer=op.name)
        qw = lw.qweight
        codes, scales = qw.codes, qw.scales.to(torch.float32)
        zeros = None if wcfg.symmetric else qw.zero_points
        g_idx = None if qw.sequential_groups else qw.g_idx.to(torch.int64)
    qp = None
    if acfg is not None and not acfg.dynamic:
        st = stats[view.linear_input(op)]
        qp = act_qparams(st.tensor_min, st.tensor_max, acfg)
    bits = format_bits(wcfg.format) if wcfg is not None else 32
    spec = qw.spec if wcfg is not None else None
    group = wcfg.group if wcfg is not None else None
    if spec is not None and spec.granularity is Granularity.PER_GROUP:
        group = spec.group_size
    q = QLinear(ref, codes, scales, zeros, g_idx, group, bits, acfg, qp, spec)
    q.tensor_scale = qw.tensor_scale if wcfg is not None else None
    if wcfg is not None:
        q.group_axis = qw.group_axis
    if lw is not None:
        q.lorc_u, q.lorc_v = lw.lorc_u, lw.lorc_v
        q.outlier_rows, q.outlier_cols, q.outlier_values = lw.outlier_rows, lw.outlier_cols, lw.outlier_values
    return q


def _describe(q: QLinear) -> str:
    w = "w:fp" if q.codes is None else f"w:int{q.bits}/" + (f"g{q.group_size}" if q.group_size else "ch")
    if q.group_axis == "out":
        w += " along out"
    if q.codes is not None and not q.integer_weight:
        w = f"w:{q.spec.element.value}/" + (f"b{q.group_size}" if q.group_size else "ch")
    if q.lorc_u is not None:
        w += f"+lorc{q.lorc_u.shape[1]}"
    if q.outlier_values is not None:
        w += f"+{q.outlier_values.numel()} kept"
    if q.fp_channels is not None:
        w += f"+{q.fp_channels.numel()} fp channels"
    if q.act is None:
        return f"{w} a:fp"
    if q.act_qparams is not None:
        return f"{w} a:{q.act.format}/tensor static (scale {q.act_qparams.scale:.3g})"
    return f"{w} a:{q.act.format}/{q.act.granularity.value} dynamic"
