"""AWQ / SmoothQuant+-style scale search for weight-only quantization.

Per smoothing site (an activation and the linears reading it, found by `qpass.graph.regions`),
input channel j of every sink weight is multiplied by ``s_j = mean|X_j|^alpha`` (normalised
to a geometric mean of 1) and the producer absorbs ``1/s_j``, exactly as `smooth_quant` does.
Salient input channels (large mean activation) then get finer effective weight steps.
``alpha`` is searched per site on a grid by the summed relative output error of the sinks,
``||X Wᵀ - (X/s) Q(W s)ᵀ||² / ||X Wᵀ||²``, on calibration rows with the recipe's weight format
(activations stay float: weight-only). ``alpha = 0`` (s = 1) is always on the grid, so a site
is only changed when scaling lowers its measured error; sites whose producer cannot absorb a
per-channel factor are skipped with the reason. The rewrite is equivalent (verified by the
pass manager); the quantizer that follows rounds the scaled weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import StatKind, StatRequest, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import EditPlan, ScaleChannels, SiteNote
from qpass.graph.regions import Absorber, Site, absorbable_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass
from qpass.passes.smooth import tile_to
from qpass.qconfig import INT_FORMATS, WeightQuantConfig
from qpass.quant.qlinear import canonical_weight, fake_quant_weight


@dataclass(frozen=True)
class AWQConfig:
    """`grid`: the alphas tried per site (0 = no scaling, always added); `search_rows`: calibration rows scored."""

    grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    search_rows: int = 512
    min_scale: float = 1e-4

    def __post_init__(self) -> None:
        for a in self.grid:
            if not 0.0 <= a <= 1.0:
                msg = f"recipe key 'awq.grid': {a} is outside [0, 1]"
                raise ConfigError(msg)
        if self.search_rows < 1:
            msg = f"recipe key 'awq.search_rows': must be >= 1, got {self.search_rows}"
            raise ConfigError(msg)
        if not self.min_scale > 0:
            msg = f"recipe key 'awq.min_scale': must be > 0, got {self.min_scale}"
            raise ConfigError(msg)


def awq_scales(act_mean_abs: torch.Tensor, alpha: float, floor: float, period: int | None) -> torch.Tensor:
    """``s = mean|X|^alpha`` (per head position when `period` is set), geometric mean 1; unseen channels 1."""
    a = act_mean_abs.to(torch.float64)
    if period is not None:
        a = a.view(-1, period).mean(0)
    s = a.clamp_min(floor).pow(alpha)
    s = torch.where(a > 0, s, torch.ones_like(s))
    return (s / s.log().mean().exp()).clamp_min(floor)


def weight_only_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, wcfg: WeightQuantConfig
) -> float:
    """Summed relative output error of the sinks with input channels scaled by `s` and weights fake-quantized."""
    total = 0.0
    xs = x / s
    for w in weights:
        ref = x @ w.T
        out = xs @ fake_quant_weight(w * s, wcfg).T
        total += float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))
    return total


class AWQ(QPass):
    """Activation-aware weight scaling, searched per site, folded into the producer exactly."""

    name = "awq"

    def _sites(self, view: GraphView) -> tuple[list[tuple[Site, Absorber]], list[SiteNote]]:
        usable, rejected = absorbable_sites(view)
        return usable, [SiteNote(label, False, reason) for label, reason in rejected]

    def _format(self, ctx: PassContext) -> WeightQuantConfig:
        w = ctx.weights
        if w is None or w.format not in INT_FORMATS:
            got = "none" if w is None else repr(w.format)
            msg = f"pass 'awq' needs an integer weight format in the recipe's 'weights' (got {got})"
            raise ConfigError(msg)
        return w

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        self._format(ctx)
        usable, _ = self._sites(view)
        return [StatRequest(site.value, frozenset({StatKind.SAMPLES})) for site, _ in usable]

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        wcfg = self._format(ctx)
        usable, notes = self._sites(view)
        plan = EditPlan(self.name, notes=notes)
        grid = sorted({0.0, *self.config.grid})
        for site, absorber in usable:
            x = stats[site.value].samples[: self.config.search_rows].to(torch.float32)
            weights = [canonical_weight(view.read(s.weight.const), s.weight) for s in site.sinks]
            mean_abs = x.abs().mean(0)
            errors = {}
            for alpha in grid:
                s = tile_to(
                    awq_scales(mean_abs, alpha, self.config.min_scale, absorber.period), site.channels
                )
                errors[alpha] = weight_only_error(x, weights, s.to(torch.float32), wcfg)
            best = min(grid, key=lambda a: (errors[a], a))
            if best == 0.0:
                plan.notes.append(
                    SiteNote(site.label, False, f"alpha=0 is best (rel. err {errors[0.0]:.3e})")
                )
                continue
            s = awq_scales(mean_abs, best, self.config.min_scale, absorber.period)
            for sink in site.sinks:
                plan.edits.append(
                    ScaleChannels(
                        sink.weight.const, sink.weight.in_axis, tile_to(s, site.channels), site=site.label
                    )
                )
            for const, axis in absorber.targets:
                plan.edits.append(
                    ScaleChannels(const, axis, 1.0 / tile_to(s, const.shape[axis]), site=site.label)
                )
            detail = f"alpha={best:g}, rel. err {errors[0.0]:.3e} -> {errors[best]:.3e}, via {absorber.path}"
            plan.notes.append(SiteNote(site.label, True, detail))
        return plan
