"""Mixed precision on a graph: measure each linear's sensitivity to each candidate weight format,
then pick one format per layer under a bits-per-weight budget (`qpass.quant.allocation`'s solver).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from qpass.calibration import Stats
from qpass.errors import ConfigError, PreconditionError
from qpass.graph.edits import SiteNote
from qpass.graph.refs import OpKind
from qpass.graph.view import GraphView, iter_linear_ops
from qpass.qconfig import MixedPrecisionConfig, WeightQuantConfig
from qpass.quant.allocation import Candidate, LayerChoice, allocate_bits, storage_bits
from qpass.quant.lorc import layer_error
from qpass.quant.qlinear import canonical_weight, weight_spec
from qpass.quant.weight_quant import LayerWeight, quantize_weight
from qpass.threads import single_thread

__all__ = ["choose_formats"]

SMALL_MODEL_WEIGHTS = 1_000_000  # up to this many linear weights, sensitivity forwards run on one thread


def _label(cfg: WeightQuantConfig) -> str:
    return f"{cfg.format}/" + ("ch" if cfg.group is None else f"g{cfg.group}")


def _candidate_configs(wcfg: WeightQuantConfig) -> list[WeightQuantConfig]:
    """The base weight config and each `mixed.candidates` entry as plain (non-mixed) configs, deduplicated."""
    base = dataclasses.replace(wcfg, mixed=None)
    out = {_label(base): base}
    for i, c in enumerate(wcfg.mixed.candidates):
        try:
            cfg = dataclasses.replace(base, format=c.format, group=c.group)
        except ConfigError as exc:
            msg = f"recipe key 'weights.mixed.candidates[{i}]': {exc}"
            raise ConfigError(msg) from None
        out.setdefault(_label(cfg), cfg)
    return list(out.values())


def _output_error(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    num = sum(float(((o.double() - r.double()) ** 2).sum()) for o, r in zip(outs, refs, strict=True))
    den = sum(float((r.double() ** 2).sum()) for r in refs)
    return num / max(den, 1e-30)


def _check_budget_first(view: GraphView, cands: list[WeightQuantConfig], mixed: MixedPrecisionConfig) -> int:
    """Refuse an infeasible budget before spending time on sensitivities (costs need no data).

    Returns the number of weights of the linears to quantize.
    """
    least = n = 0
    for op in iter_linear_ops(view):
        ref = view.weight(op)
        if op.kind is not OpKind.LINEAR or ref is None or len(ref.const.shape) != 2:
            continue
        shape = (ref.out_features, ref.in_features)
        costs = [
            storage_bits(weight_spec(c), shape, scale_bits=mixed.scale_bits)
            for c in cands
            if c.group is None or shape[1] % c.group == 0
        ]
        least += min(costs, default=0)
        n += shape[0] * shape[1]
    if n and least > mixed.budget_bits * n:
        msg = (
            f"recipe key 'weights.mixed.budget_bits': {mixed.budget_bits:g} bits/weight is below the cheapest "
            f"allocation ({least / n:.4f} bits/weight with {mixed.scale_bits}-bit scales); "
            "raise it or add cheaper candidates"
        )
        raise ConfigError(msg)
    return n


def choose_formats(
    view: GraphView, stats: Stats, wcfg: WeightQuantConfig, batches: Sequence[Any] | None
) -> tuple[dict[str, tuple[WeightQuantConfig, LayerWeight]], list[SiteNote]]:
    """Measure every linear's sensitivity to every candidate format, then allocate under the budget.

    Returns ``{op name: (weight config, LayerWeight)}`` (the chosen, already quantized weight)
    and per-layer notes. Sensitivity (``wcfg.mixed.sensitivity``): ``model_output`` writes
    only that layer's quantized weight into the graph, runs ``sensitivity_batches`` calibration
    batches and measures the relative squared error of all float outputs against the float
    model (then restores the weight); ``layer_output`` uses the layer's own output error
    ``tr(E H Eᵀ)/tr(W H Wᵀ)``. Errors are added across layers (the knapsack's assumption).
    """
    mixed = wcfg.mixed
    cands = _candidate_configs(wcfg)
    use_model = mixed.sensitivity == "model_output"
    if use_model:
        if not batches:
            msg = "weights.mixed.sensitivity=model_output needs calibration batches"
            raise PreconditionError(msg)
        sample = list(batches[: mixed.sensitivity_batches])
        refs = [view.run(b) for b in sample]
    n_weights = _check_budget_first(view, cands, mixed)
    small = n_weights <= SMALL_MODEL_WEIGHTS  # many tiny forwards: OpenMP hand-offs would dominate
    layers, quantized, cfgs = [], [], []
    for op in iter_linear_ops(view):
        ref = view.weight(op)
        if op.kind is not OpKind.LINEAR or ref is None or len(ref.const.shape) != 2:
            continue
        stored = view.read(ref.const)
        w = canonical_weight(stored, ref)
        xtx = stats[view.linear_input(op)].xtx if wcfg.needs_hessian else None
        options, lws, layer_cfgs = [], [], []
        for cfg in cands:
            if cfg.group is not None and w.shape[1] % cfg.group:
                continue  # this grouping does not tile the layer
            spec = weight_spec(cfg)
            lw = quantize_weight(w, cfg, spec, xtx, layer=op.name)
            wq = lw.effective()
            if use_model:
                view.write(ref.const, wq if ref.out_axis == 0 else wq.T)
                view.invalidate()
                with single_thread(small):
                    outs = [view.run(b) for b in sample]
                err = sum(_output_error(o, r) for o, r in zip(outs, refs, strict=True)) / len(sample)
                view.write(ref.const, stored)
                view.invalidate()
            else:
                err = layer_error(w, wq, xtx)
            bits = storage_bits(spec, tuple(w.shape), scale_bits=mixed.scale_bits)
            options.append(Candidate(_label(cfg), float(bits), float(err)))
            lws.append(lw)
            layer_cfgs.append(cfg)
        if not options:
            msg = f"layer '{op.name}': no mixed-precision candidate tiles its {w.shape[1]} input channels"
            raise ConfigError(msg)
        layers.append(LayerChoice(op.name, tuple(options), int(w.numel())))
        quantized.append(lws)
        cfgs.append(layer_cfgs)
    if not layers:
        return {}, []
    alloc = allocate_bits(layers, budget_bits_avg=mixed.budget_bits, method=mixed.method)
    chosen, notes = {}, []
    n_total = sum(layer.n_weights for layer in layers)
    for layer, k, lws, layer_cfgs in zip(layers, alloc.choices, quantized, cfgs, strict=True):
        chosen[layer.name] = (layer_cfgs[k], lws[k])
        c = layer.candidates[k]
        others = ", ".join(f"{o.label} {o.error:.2e}" for o in layer.candidates)
        detail = f"mixed: {c.label} ({c.bits / layer.n_weights:.3f} bits/weight); sensitivity {others}"
        notes.append(SiteNote(layer.name, True, detail))
    summary = (
        f"mixed precision: {alloc.avg_bits(n_total):.4f} bits/weight (budget {mixed.budget_bits:g}, "
        f"incl. {mixed.scale_bits}-bit scales), summed {mixed.sensitivity} error {alloc.total_error:.3e}, "
        f"{'optimal' if alloc.is_optimal else 'not proven optimal'} ({alloc.method})"
    )
    notes.append(SiteNote("mixed_precision", True, summary))
    return chosen, notes
