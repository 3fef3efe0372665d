"""Norm fusion: fold a norm's gamma (and beta) into the linears it feeds.

LN(x) = x_hat * gamma + beta feeding y = W LN(x) + b becomes x_hat feeding (W diag(gamma)) and
bias b + W beta; the norm keeps gamma = 1, beta = 0. Any per-channel scale producer (the
`weight * x` of a decomposed RMSNorm) folds the same way. This is the first step of the
QuaRot/SliceGPT layout: a gamma-free RMSNorm commutes with rotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import Stats
from qpass.graph.edits import EditPlan, ScaleChannels, ShiftChannels, SiteNote
from qpass.graph.refs import ConstRef, OpKind
from qpass.graph.regions import Site, find_sites, is_channel_vector
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass
from qpass.quant.qlinear import canonical_weight


@dataclass(frozen=True)
class FuseNormsConfig:
    """No options yet: every norm whose output only feeds linears is fused."""


def _norm_constants(view: GraphView, site: Site) -> tuple[ConstRef, ConstRef | None] | str:
    """(gamma, beta) of the per-channel affine producer of the site's activation, or why not."""
    op = view.producer(site.value)
    while op is not None and op.kind is OpKind.CAST:
        (src,) = view.value_operands(op)
        op = view.producer(src)
    if op is None:
        return "activation is a graph input"
    if op.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
        params = view.norm_params(op)
        if params is None or params.gamma is None:
            return f"{op.op_type} '{op.name}' has no per-channel gamma"
        return params.gamma, params.beta
    const_act = view.constant_operand(op) if op.kind is OpKind.MUL else None
    if const_act is None or not is_channel_vector(const_act[0], site.channels):
        return f"producer {op.op_type} '{op.name}' is not a norm or a per-channel scale"
    return const_act[0], None


class FuseNorms(QPass):
    """gamma -> consumers' input columns, beta -> consumers' biases."""

    name = "fuse_norms"

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        sites, rejected = find_sites(view)
        plan = EditPlan(self.name, notes=[SiteNote(label, False, reason) for label, reason in rejected])
        for site in sites:
            found = _norm_constants(view, site)
            if isinstance(found, str):
                plan.notes.append(SiteNote(site.label, False, found))
                continue
            gamma, beta = found
            shared = [c for c in (gamma, beta) if c is not None and view.const_users(c) != 1]
            if shared:
                plan.notes.append(SiteNote(site.label, False, f"constant '{shared[0].name}' is shared"))
                continue
            g = view.read(gamma).reshape(-1).to(torch.float64)
            b = view.read(beta).reshape(-1).to(torch.float64) if beta is not None else None
            if b is not None and bool(b.any()) and any(s.weight.bias is None for s in site.sinks):
                plan.notes.append(
                    SiteNote(site.label, False, "a consumer has no bias to take the norm's beta")
                )
                continue
            for sink in site.sinks:
                if b is not None and sink.weight.bias is not None:
                    w = canonical_weight(view.read(sink.weight.const), sink.weight).to(torch.float64)
                    plan.edits.append(
                        ShiftChannels(sink.weight.bias, (w @ b).to(torch.float32), site=site.label)
                    )
                plan.edits.append(ScaleChannels(sink.weight.const, sink.weight.in_axis, g, site=site.label))
            safe = torch.where(g == 0, torch.ones_like(g), g)
            plan.edits.append(ScaleChannels(gamma, len(gamma.shape) - 1, 1.0 / safe, site=site.label))
            if b is not None:
                plan.edits.append(ShiftChannels(beta, -view.read(beta), site=site.label))
            plan.notes.append(
                SiteNote(
                    site.label, True, f"folded {gamma.name}" + (f" and {beta.name}" if b is not None else "")
                )
            )
        return plan
