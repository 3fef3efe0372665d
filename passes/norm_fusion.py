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
from qpass.graph.edits import Edit, ScaleChannels, ShiftChannels
from qpass.graph.regions.absorbers import norm_constants
from qpass.graph.regions.sites import Site, find_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.quant.qlinear import canonical_weight


@dataclass(frozen=True)
class FuseNormsConfig:
    """No options yet: every norm whose output only feeds linears is fused."""


class FuseNorms(QPass[FuseNormsConfig, Site]):
    """gamma -> consumers' input columns, beta -> consumers' biases."""

    name = "fuse_norms"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Site]:
        return SiteList(*find_sites(view))

    def check(self, site: Site, view: GraphView, stats: Stats, ctx: PassContext) -> str | None:
        found = norm_constants(view, site)
        if isinstance(found, str):
            return found
        gamma, beta = found
        shared = [c for c in (gamma, beta) if c is not None and view.const_users(c) != 1]
        if shared:
            return f"constant '{shared[0].name}' is shared"
        if (
            beta is not None
            and bool(view.read(beta).any())
            and any(s.weight.bias is None for s in site.sinks)
        ):
            return "a consumer has no bias to take the norm's beta"
        return None

    def rewrite(self, site: Site, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite:
        gamma, beta = norm_constants(view, site)
        g = view.read(gamma).reshape(-1).to(torch.float64)
        b = view.read(beta).reshape(-1).to(torch.float64) if beta is not None else None
        edits: list[Edit] = []
        for sink in site.sinks:
            if b is not None and sink.weight.bias is not None:
                w = canonical_weight(view.read(sink.weight.const), sink.weight).to(torch.float64)
                edits.append(ShiftChannels(sink.weight.bias, (w @ b).to(torch.float32), site=site.label))
            edits.append(ScaleChannels(sink.weight.const, sink.weight.in_axis, g, site=site.label))
        safe = torch.where(g == 0, torch.ones_like(g), g)
        edits.append(ScaleChannels(gamma, len(gamma.shape) - 1, 1.0 / safe, site=site.label))
        if b is not None:
            edits.append(ShiftChannels(beta, -view.read(beta), site=site.label))
        return Rewrite(edits, f"folded {gamma.name}" + (f" and {beta.name}" if b is not None else ""))
