"""The quantized plan of an LLM.int8()-decomposed linear (the `int8_decompose` pass chooses the
float input channels; this builds the split layer): which formats it supports, and its QLinear.
"""

from __future__ import annotations

import torch

from qpass.calibration import Stats
from qpass.errors import ConfigError
from qpass.graph.refs import OpRef, WeightRef
from qpass.graph.view import GraphView
from qpass.qconfig import INT_FORMATS, ActGranularity, ActivationQuantConfig, WeightQuantConfig, format_bits
from qpass.quant.qlinear import QLinear, canonical_weight, weight_spec
from qpass.quant.weight_quant import quantize_weight


def check_formats(wcfg: WeightQuantConfig | None, acfg: ActivationQuantConfig | None) -> None:
    """The quantization a decomposed layer supports: INTn per-token dynamic activations and
    symmetric per-channel INTn weights (RTN or GPTQ). No quantization at all is fine (FP pass).
    """
    if wcfg is None and acfg is None:
        return
    want = "{format: int8, granularity: per_token, dynamic: true}"
    if acfg is None:
        msg = (
            f"recipe key 'activations': int8_decompose splits quantized activations; set activations: {want}"
        )
        raise ConfigError(msg)
    if acfg.format not in INT_FORMATS:
        msg = (
            f"recipe key 'activations.format': int8_decompose needs integer activations, got {acfg.format!r}"
        )
        raise ConfigError(msg)
    if acfg.granularity is not ActGranularity.PER_TOKEN or not acfg.dynamic:
        msg = (
            f"recipe key 'activations.granularity': int8_decompose supports dynamic per-token activations "
            f"only ({want}), got {acfg.granularity.value}{' dynamic' if acfg.dynamic else ' static'}"
        )
        raise ConfigError(msg)
    if wcfg is None:
        msg = "recipe key 'weights': int8_decompose needs integer weights, e.g. weights: {format: int8}"
        raise ConfigError(msg)
    bad = [
        ("format", wcfg.format not in INT_FORMATS, f"an integer format {INT_FORMATS}"),
        ("group", wcfg.group is not None, "per output channel weights (group: null)"),
        ("symmetric", not wcfg.symmetric, "symmetric weights"),
        ("algo", wcfg.algo == "awq", "algo rtn or gptq (AWQ rescales channels after the choice)"),
        ("lorc_rank", wcfg.lorc_rank > 0, "no low-rank term"),
        ("protect", wcfg.protect != 0, "no protected weights"),
        ("mixed", wcfg.mixed is not None, "one weight format"),
    ]
    for key, wrong, need in bad:
        if wrong:
            msg = f"recipe key 'weights.{key}': int8_decompose needs {need}"
            raise ConfigError(msg)

def decomposed_qlinear(
    view: GraphView,
    op: OpRef,
    ref: WeightRef,
    stats: Stats | None,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
    channels: torch.Tensor,
) -> QLinear:
    """The QLinear of a decomposed layer: weight columns `channels` float, the rest quantized per
    output channel over those columns only (codes 0 at `channels`); activations per token.
    """
    check_formats(wcfg, acfg)
    if wcfg is None:  # nothing quantized (check_formats allows no other None): nothing to split
        return QLinear(ref, None, None, None, None, None, 32, None, None)
    w = canonical_weight(view.read(ref.const), ref)
    normal = torch.ones(w.shape[1], dtype=torch.bool)
    normal[channels] = False
    xtx = None
    if wcfg.needs_hessian:
        xtx = stats[view.linear_input(op)].xtx
        xtx = xtx[normal][:, normal]
    spec = weight_spec(wcfg)
    lw = quantize_weight(w[:, normal], wcfg, spec, xtx, layer=op.name)
    qw = lw.qweight
    codes = torch.zeros(w.shape, dtype=qw.codes.dtype)
    codes[:, normal] = qw.codes
    return QLinear(
        ref,
        codes,
        qw.scales.to(torch.float32),
        None,
        None,
        None,
        format_bits(wcfg.format),
        acfg,
        None,
        qw.spec,
        fp_channels=channels.to(torch.int64),
        fp_weight=w[:, channels].to(torch.float32).contiguous(),
    )
