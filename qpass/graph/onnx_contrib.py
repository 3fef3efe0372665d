"""What the inputs and outputs of ONNX Runtime's fused ops mean, read by position from their schemas.

ONNX Runtime GenAI's builder writes decoders from fused ops: `SkipSimplifiedLayerNormalization`
(`Skip*LayerNormalization(input, skip, gamma, [beta], [bias])` normalises input + skip + bias,
its output 3 is that residual sum), `SimplifiedLayerNormalization` (an RMSNorm) and
`GroupQueryAttention(query, key, value, past_key, past_value, ...)`, whose key and value are
absent when one packed q|k|v projection comes in as its query, and whose outputs 1 and 2 are the
present cache. `OnnxGraphView` answers the neutral questions (a norm's gamma, attention's V,
whether an op writes state) through these helpers, so the region walks stay ONNX-free.
"""

from __future__ import annotations

import onnx_ir as ir

# op type -> (gamma input, beta input or None); the Skip norms take input and skip first
NORM_PARAM_INPUTS: dict[str, tuple[int, int | None]] = {
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1, None),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


# fused residual norms: op type -> (number of summed activation inputs, bias input); output 3 is the sum
RESIDUAL_SUM_INPUTS: dict[str, tuple[int, int]] = {
    "SkipLayerNormalization": (2, 4),
    "SkipSimplifiedLayerNormalization": (2, 3),
}
SUM_OUTPUT = 3


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    return node.inputs[index] if index is not None and len(node.inputs) > index else None


def norm_param_values(node: ir.Node, layer_norm: bool) -> tuple[ir.Value | None, ir.Value | None]:
    """(gamma, beta) inputs of a norm node (beta None for RMS norms)."""
    g_at, b_at = NORM_PARAM_INPUTS.get(node.op_type, (1, 2 if layer_norm else None))
    return _input(node, g_at), _input(node, b_at)


def attention_qkv(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None, ir.Value | None]:
    """Query, key and value inputs of an attention node; None where absent (packed into the query)."""
    q, k, v = (_input(node, i) for i in range(3))
    return q, k, v


def writes_state(node: ir.Node) -> bool:
    """Whether any output after the first is read or leaves the graph (attention's present K/V)."""
    return any(out.uses() or out.is_graph_output() for out in node.outputs[1:])


def residual_sum_values(node: ir.Node) -> tuple[list[ir.Value], ir.Value | None, ir.Value | None] | None:
    """(summed inputs, bias input, sum output) of a fused residual norm; None for any other node."""
    layout = RESIDUAL_SUM_INPUTS.get(node.op_type)
    if layout is None:
        return None
    count, bias_at = layout
    total = node.outputs[SUM_OUTPUT] if len(node.outputs) > SUM_OUTPUT else None
    used = total is not None and (total.uses() or total.is_graph_output())
    return [node.inputs[i] for i in range(count)], _input(node, bias_at), total if used else None
