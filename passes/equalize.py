"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"; as NNCF and AIMET ship it).

For conv1 -> f -> conv2 with f positively homogeneous (`regions.conv_chains`), channel c of the
activation between them is divided by s_c (conv1's output row c and bias) and conv2's reading of
channel c multiplied by s_c; the function is unchanged. Choosing s_c = sqrt(r1_c / r2_c), with
r1_c = max |W1[c, ...]| and r2_c = max |weights of conv2 reading c|, makes both ranges
sqrt(r1_c r2_c): no channel of either weight is tiny next to the others, which is what per-tensor
weight quantization (and per-tensor activations between the convs, whose channel ranges follow
r1_c) lose resolution to.

Chains of three or more convs share weights (conv2 is the second of one pair and the first of the
next), so the scales are found by `iterations` sweeps over the pairs on a simulated copy of the
weights, as the paper iterates to convergence; each pair's edits carry the product of its sweeps.
Data-free: no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.errors import ConfigError
from qpass.graph.regions.conv_chains import (
    ConvPair,
    conv_pairs,
    equalize_edits,
    input_absmax,
    output_absmax,
    scale_input,
)
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList


@dataclass(frozen=True)
class EqualizeConfig:
    """iterations: sweeps over all pairs; scales are clamped to [1/max_scale, max_scale]."""

    iterations: int = 4
    max_scale: float = 1e3
    min_range: float = 1e-8  # a channel with a smaller weight range on either side keeps s = 1

    def __post_init__(self) -> None:
        if self.iterations < 1:
            msg = f"recipe key 'equalize.iterations': {self.iterations} must be >= 1"
            raise ConfigError(msg)
        if self.max_scale <= 1.0:
            msg = f"recipe key 'equalize.max_scale': {self.max_scale} must be > 1"
            raise ConfigError(msg)


class CrossLayerEqualization(QPass[EqualizeConfig, ConvPair]):
    """Equalize per-channel weight ranges across Conv -> ReLU -> Conv chains, exactly."""

    name = "equalize"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[ConvPair]:
        return SiteList(*conv_pairs(view))

    def plan_sites(self, plan, sites, view: GraphView, stats, ctx: PassContext) -> None:
        """Sweep the pairs `iterations` times on simulated weights, then emit one rewrite per pair."""
        weights = {}
        for pair in sites:
            for ref in (pair.first_w, pair.second_w):
                if ref.const.name not in weights:
                    weights[ref.const.name] = view.read(ref.const).to(torch.float64)
        totals = {pair.label: torch.ones(pair.channels, dtype=torch.float64) for pair in sites}
        for _ in range(self.config.iterations):
            for pair in sites:
                w1, w2 = weights[pair.first_w.const.name], weights[pair.second_w.const.name]
                s = self._scales(output_absmax(pair, w1), input_absmax(pair, w2))
                weights[pair.first_w.const.name] = w1 / s.view(-1, *([1] * (w1.dim() - 1)))
                weights[pair.second_w.const.name] = scale_input(pair, weights[pair.second_w.const.name], s)
                totals[pair.label] *= s
        self._totals = totals
        super().plan_sites(plan, sites, view, stats, ctx)

    def _scales(self, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ok = (r1 > cfg.min_range) & (r2 > cfg.min_range)
        s = torch.where(ok, (r1.clamp_min(cfg.min_range) / r2.clamp_min(cfg.min_range)).sqrt(), 1.0)
        return s.clamp(1.0 / cfg.max_scale, cfg.max_scale)

    def rewrite(self, site: ConvPair, view: GraphView, stats, ctx: PassContext) -> Rewrite | str:
        s = self._totals[site.label].to(torch.float32)
        if bool(torch.allclose(s, torch.ones_like(s), rtol=0, atol=1e-6)):
            return "ranges already equal (every scale is 1)"
        r1 = output_absmax(site, view.read(site.first_w.const))
        r2 = input_absmax(site, view.read(site.second_w.const))
        spread = float((r1 / r2.clamp_min(1e-12)).max() / (r1 / r2.clamp_min(1e-12)).min().clamp_min(1e-12))
        kind = "depthwise" if site.depthwise_multiplier is not None else "dense"
        note = f"{site.channels} channels ({kind} consumer), scales {float(s.min()):.3g}..{float(s.max()):.3g}"
        return Rewrite(equalize_edits(site, s), f"{note}, range ratio spread {spread:.3g}x before")
