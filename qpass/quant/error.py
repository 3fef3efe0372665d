"""Per-layer quantization error of a graph, measured on its own activations (both graph kinds).

Why: to show what an equivalent transform buys, compare the error each linear would make under a
weight/activation format before and after the transform, without lowering anything (the ONNX
lowering has no per-token activations yet, but this measurement needs none).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from qpass.graph.refs import OpKind, ValueRef
from qpass.graph.view import GraphView, iter_linear_ops
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import act_qparams, canonical_weight, fake_quant_act, fake_quant_weight, weight_spec
from qpass.quant.weight_quant import quantize_weight


def linear_output_errors(
    view: GraphView,
    batches: Iterable[Any],
    weights: WeightQuantConfig | None,
    activations: ActivationQuantConfig | None,
) -> dict[str, float]:
    """For each 2-D linear: sum ||Q(x) Q(W)^T - x W^T||^2 / sum ||x W^T||^2 over the batches.

    Activations must be dynamic (per token or per tensor at run time): no calibrated ranges here.
    Weights go through the pipeline's weight quantizer (RTN, clip searches, GPTQ, protection,
    LoRC), with the X^T X of the same batches where the config needs one.
    """
    batches = list(batches)
    if activations is not None and not activations.dynamic:
        msg = "linear_output_errors: activations must be dynamic (per-token or per-tensor at run time)"
        raise ValueError(msg)
    ops = [op for op in iter_linear_ops(view) if op.kind is OpKind.LINEAR]
    ops = [op for op in ops if len(view.weight(op).const.shape) == 2]
    inputs = {op.name: view.linear_input(op) for op in ops}
    w_fp = {}
    for op in ops:
        ref = view.weight(op)
        w_fp[op.name] = canonical_weight(view.read(ref.const), ref).to(torch.float64)
    w_q = w_fp
    if weights is not None:
        hessians = _hessians(view, inputs, batches) if weights.needs_hessian else {}
        w_q = {name: _quantized(w, hessians.get(name), weights, name) for name, w in w_fp.items()}
    num = dict.fromkeys(w_fp, 0.0)
    den = dict.fromkeys(w_fp, 0.0)
    for observed in view.observe_stream(list(dict.fromkeys(inputs.values())), batches):
        for name, value in inputs.items():
            x = _rows(observed[value.name])
            xq = x if activations is None else fake_quant_act(x, activations, None)
            ref = x.double() @ w_fp[name].T
            out = xq.double() @ w_q[name].T
            num[name] += float(((out - ref) ** 2).sum())
            den[name] += float((ref**2).sum())
    return {name: num[name] / max(den[name], 1e-30) for name in num}


def _rows(x: Any) -> torch.Tensor:
    x = torch.as_tensor(x).to(torch.float32)
    return x.reshape(-1, x.shape[-1])


def _hessians(view: GraphView, inputs: dict[str, ValueRef], batches: list[Any]) -> dict[str, torch.Tensor]:
    """X^T X of each linear's input over the batches (GPTQ's Hessian, up to a factor)."""
    out: dict[str, torch.Tensor] = {}
    for observed in view.observe_stream(list(dict.fromkeys(inputs.values())), batches):
        for name, value in inputs.items():
            x = _rows(observed[value.name]).double()
            out[name] = out.get(name, 0) + x.T @ x
    return out


def _quantized(
    w: torch.Tensor, hessian: torch.Tensor | None, cfg: WeightQuantConfig, layer: str
) -> torch.Tensor:
    """The weight the lowered layer would apply, through the pipeline's one weight path."""
    xtx = None if hessian is None else hessian.float()
    return quantize_weight(w.float(), cfg, weight_spec(cfg), xtx, layer=layer).effective().double()


def mean_error(errors: dict[str, float]) -> float:
    """The mean over layers (each layer counts once, whatever its size)."""
    return sum(errors.values()) / max(len(errors), 1)


def rotated_output_error(
    x: torch.Tensor,
    w_out_in: torch.Tensor,
    q: torch.Tensor,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
    ref: torch.Tensor | None = None,
) -> float:
    """Relative squared error of Q_a(x q) @ Q_w(w q)^T vs the FP x @ w^T (= `ref`), q orthogonal.

    What a linear would lose if it read x in the basis q, at the recipe's formats: RTN weights
    (GPTQ lowers both sides of a comparison alike), activations dynamic as configured or, for
    static ones, per tensor over the rows given.
    """
    if ref is None:
        ref = x @ w_out_in.T
    xr, wr = x @ q, w_out_in @ q
    if acfg is not None:
        qp = None if acfg.dynamic else act_qparams(float(xr.min()), float(xr.max()), acfg)
        xr = fake_quant_act(xr, acfg, qp)
    if wcfg is not None:
        wr = fake_quant_weight(wr, wcfg)
    out = xr @ wr.T
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))
