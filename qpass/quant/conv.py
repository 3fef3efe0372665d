"""Conv layers in the quantize plan, and the report lines for every op the plan leaves in float.

A Conv1d/2d/3d weight [out, in/groups, k...] is quantized on its canonical 2-D view
[out, in/groups * k...] (`canonical_weight`), by the same weight code as a linear: per output
channel, or in groups along that flattened reduction axis. Lowering reshapes the codes back.

Activations: W8A8 static takes the calibrated per-tensor range of the conv input, and also
quantizes the conv output (per tensor, calibrated): ONNX Runtime fuses DequantizeLinear -> Conv ->
QuantizeLinear into QLinearConv only when the output is quantized, so the torch form does the
same arithmetic. A Conv whose only reader is a clamp with constant bounds (Relu, ReLU6 / Clip,
hardtanh) takes its calibrated output range cut to those bounds: the codes clamp there anyway, so
Q(clip(y)) = Q(y), and no resolution goes to values the clamp throws away (EfficientNet-Lite's
pre-ReLU6 outputs reach -40, its post-ReLU6 ones stop at 6). Dynamic activations are per tensor for a conv (it has no
token axis): absmax over the whole input at run time.
"""

from __future__ import annotations

import dataclasses

from qpass.calibration import Stats
from qpass.graph.edits import SiteNote
from qpass.graph.refs import OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.view import GraphView
from qpass.qconfig import ActGranularity, ActivationQuantConfig, WeightQuantConfig, is_block_format
from qpass.quant.qlinear import QLinear, act_qparams


def conv_act_config(acfg: ActivationQuantConfig | None) -> ActivationQuantConfig | None:
    """A conv's activation config: dynamic per token becomes dynamic per tensor (no token axis)."""
    if acfg is not None and acfg.dynamic and acfg.granularity is ActGranularity.PER_TOKEN:
        return dataclasses.replace(acfg, granularity=ActGranularity.PER_TENSOR)
    return acfg


def quantizes_output(view: GraphView, op: OpRef, acfg: ActivationQuantConfig | None) -> bool:
    """Static int8 activations: the conv output gets its own Q/DQ (unless it leaves the graph)."""
    static = acfg is not None and not acfg.dynamic and acfg.format == "int8"
    return static and not view.is_graph_output(view.op_output(op))


def conv_output_values(view: GraphView, acfg: ActivationQuantConfig | None) -> list[ValueRef]:
    """The conv outputs whose range calibration must collect."""
    return [
        view.op_output(op)
        for op in view.ops(frozenset({OpKind.CONV}))
        if view.weight(op) is not None and quantizes_output(view, op, acfg)
    ]


def conv_skip_reason(wcfg: WeightQuantConfig | None, acfg: ActivationQuantConfig | None) -> str | None:
    """Why the recipe's formats cannot quantize a conv (None: they can)."""
    if wcfg is not None:
        if wcfg.needs_hessian:
            return (
                "GPTQ / LoRC / protection / layer sensitivity on Conv need the im2col Hessian (not built yet)"
            )
        if wcfg.mixed is not None:
            return "mixed-precision format choice covers linears only"
        if is_block_format(wcfg.format):
            return f"{wcfg.format} weights are not lowered for Conv"
        if wcfg.group_axis != "in":
            return "weight groups along the output channels are not lowered for Conv"
    if acfg is not None and is_block_format(acfg.format):
        return f"{acfg.format} activations are not lowered for Conv"
    if acfg is not None and not acfg.dynamic and acfg.format != "int8":
        return f"static {acfg.format} activations are not lowered for Conv (QDQ takes int8)"
    return None


def plan_conv(
    view: GraphView,
    op: OpRef,
    ref: WeightRef,
    stats: Stats | None,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
) -> QLinear:
    """The conv's quantized form: weights on the [out, in/groups * k...] view, input (and output) ranges."""
    from qpass.quant.qlinear import _quantize_linear

    cfg = conv_act_config(acfg)
    q = _quantize_linear(view, op, ref, stats, wcfg, cfg)
    q.conv_shape = tuple(ref.const.shape)
    if quantizes_output(view, op, cfg):
        out = view.op_output(op)
        st = stats[out]
        q.out_qparams = act_qparams(st.tensor_min, st.tensor_max, cfg)
        bounds = _clamp_reader(view, out)
        if bounds is not None:
            lo, hi = max(st.tensor_min, bounds[0]), min(st.tensor_max, bounds[1])
            narrowed = act_qparams(lo, hi, cfg)
            grid = ((narrowed.qmin - narrowed.zero_point) * narrowed.scale,
                    (narrowed.qmax - narrowed.zero_point) * narrowed.scale)
            if grid[0] >= bounds[0] - 1e-6 and grid[1] <= bounds[1] + 1e-6:  # else Q(clip(y)) != Q(y)
                q.out_qparams = narrowed
    return q


def _clamp_reader(view: GraphView, value: ValueRef) -> tuple[float, float] | None:
    """The (lo, hi) of the clamp that is `value`'s only reader, or None."""
    readers = view.consumers(value)
    if len(readers) != 1 or readers[0].kind is not OpKind.ACTIVATION:
        return None
    return view.clip_bounds(readers[0])


def describe_conv(q: QLinear, layer: str) -> str:
    """The report line of a conv: its weight shape, `layer` (the linear's description), its output."""
    shape = "x".join(str(d) for d in q.conv_shape)
    out = f", out:int8/tensor static (scale {q.out_qparams.scale:.3g})" if q.out_qparams is not None else ""
    return f"conv [{shape}] {layer}{out}"


def unquantized_notes(view: GraphView, planned: set[str]) -> list[SiteNote]:
    """A note for every quantizable op that the plan leaves in float, with the reason."""
    notes = []
    kinds = frozenset({OpKind.LINEAR, OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.MATMUL})
    for op in view.ops(kinds):
        if op.name in planned:
            continue
        if op.kind is OpKind.CONV_TRANSPOSE:
            reason = f"{op.op_type}: transposed convolution is not quantized yet; left in float"
        elif op.kind is OpKind.MATMUL:
            reason = f"{op.op_type}: both operands are activations (no constant weight); left in float"
        elif view.weight(op) is None:
            reason = f"{op.op_type}: the weight is not a constant; left in float"
        else:
            continue  # planned ops and ops the planner already reported
        notes.append(SiteNote(op.name, False, reason))
    return notes
