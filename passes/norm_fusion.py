"""Norm fusion: fold a norm's gamma (and beta) into the linears it feeds.

LN(x) = x_hat * gamma + beta feeding y = W LN(x) + b becomes x_hat feeding (W diag(gamma)) and
bias b + W beta; the norm keeps gamma = 1, beta = 0. Any per-channel scale producer (the
`weight * x` of a decomposed RMSNorm) folds the same way. This is the first step of the
QuaRot/SliceGPT layout: a gamma-free RMSNorm commutes with rotations.

A gamma can also be what keeps a model quantizable: SmolLM2's RMSNorms carry gammas of ~1e-4 on
its massive residual channels. Fused, those channels dominate every rotated linear input (and the
tiny weight columns they leave are spread over every column), so per-token activation scales and
weight scales are set by them. `keep_gamma: auto` measures, per norm, the consumers' quantized
output error through a Hadamard rotation both ways on calibration rows and keeps the gamma where
that is lower by `min_gain`; the rotate pass then reads that norm through an online Q^T and
rotates its output online (two fast Hadamards per kept norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qpass.calibration import StatKind, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import Edit, ScaleChannels, ShiftChannels
from qpass.graph.refs import ConstRef
from qpass.graph.regions.absorbers import norm_constants
from qpass.graph.regions.sites import Site, find_sites
from qpass.graph.view import GraphView
from qpass.math.hadamard import has_hadamard, randomized_hadamard
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.quant.error import rotated_output_error
from qpass.quant.qlinear import canonical_weight


@dataclass(frozen=True)
class FuseNormsConfig:
    """keep_gamma: 'never' fuses every norm whose output only feeds linears (QuaRot's layout);
    'auto' keeps a norm's gamma where its consumers, quantized at the recipe's formats behind a
    Hadamard, measure `min_gain` times less output error with it kept than fused (on up to
    `search_rows` calibration rows).
    """

    keep_gamma: Literal["never", "auto"] = "never"
    min_gain: float = 1.5
    search_rows: int = 256

    def __post_init__(self) -> None:
        if self.keep_gamma not in ("never", "auto"):
            msg = f"recipe key 'fuse_norms.keep_gamma': {self.keep_gamma!r}; expected 'never' or 'auto'"
            raise ConfigError(msg)
        if not self.min_gain >= 1.0:
            msg = f"recipe key 'fuse_norms.min_gain': {self.min_gain} is below 1"
            raise ConfigError(msg)


class FuseNorms(QPass[FuseNormsConfig, Site]):
    """gamma -> consumers' input columns, beta -> consumers' biases."""

    name = "fuse_norms"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Site]:
        return SiteList(*find_sites(view))

    def _measures(self, ctx: PassContext) -> bool:
        return self.config.keep_gamma == "auto" and (ctx.weights is not None or ctx.activations is not None)

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        return frozenset({StatKind.SAMPLES}) if self._measures(ctx) else frozenset()

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
        if self._measures(ctx) and beta is None:
            return self._kept_gamma(site, view, stats, ctx, gamma)
        return None

    def _kept_gamma(
        self, site: Site, view: GraphView, stats: Stats, ctx: PassContext, gamma: ConstRef
    ) -> str | None:
        """The reason to keep this gamma (measured), or None to fuse it."""
        st = stats[site.value]
        n = site.channels
        if st.samples is None or not has_hadamard(n):
            return None
        y = st.samples[: self.config.search_rows].to(torch.float32)
        g = view.read(gamma).reshape(-1).to(torch.float32)
        if bool((g == 0).any()):
            return None
        q = randomized_hadamard(n, 0, dtype=torch.float32)
        fused = kept = 0.0
        for sink in site.sinks:
            w = canonical_weight(view.read(sink.weight.const), sink.weight).to(torch.float32)
            ref = y @ w.T
            fused += rotated_output_error(y / g, w * g, q, ctx.weights, ctx.activations, ref)
            kept += rotated_output_error(y, w, q, ctx.weights, ctx.activations, ref)
        if kept * self.config.min_gain >= fused:
            return None
        k = len(site.sinks)
        return (
            f"gamma kept (keep_gamma: auto): consumers' quantized output error behind a Hadamard "
            f"{kept / k:.2e} with it, {fused / k:.2e} fused"
        )

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
