"""SmoothQuant / SmoothQuant+ scale migration: s_j = max|X_j|^a / max|W_j|^(1-a).

The activation's channel j is divided by s_j upstream (norm gamma/beta, a producer linear's
output rows, one branch of an elementwise product) and every consuming linear's input column j
is multiplied by s_j. One s is shared by all consumers of an activation (q/k/v). With
`alpha: auto`, a per-site grid search picks the alpha minimising the quantized output error
of the site's linears on calibration rows (SmoothQuant+).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qpass.calibration import StatKind, StatRequest, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import EditPlan, ScaleChannels, SiteNote
from qpass.graph.regions import Absorber, Site, absorbable_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass
from qpass.quant.qlinear import canonical_weight, quantized_output_error


@dataclass(frozen=True)
class SmoothQuantConfig:
    """alpha: migration strength in [0, 1], or 'auto' to search `alpha_grid` per site."""

    alpha: float | Literal["auto"] = 0.5
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
    min_scale: float = 1e-5
    search_rows: int = 256  # calibration rows (a uniform sample) used to score each alpha

    def __post_init__(self) -> None:
        values = self.alpha_grid if self.alpha == "auto" else (self.alpha,)
        for a in values:
            if not 0.0 <= a <= 1.0:
                msg = f"recipe key 'smooth_quant.alpha': {a} is outside [0, 1]"
                raise ConfigError(msg)


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, floor: float
) -> torch.Tensor:
    """Per-channel s = a^alpha / w^(1-alpha); channels never seen active keep s = 1."""
    a = act_absmax.to(torch.float64).clamp_min(floor)
    w = weight_absmax.to(torch.float64).clamp_min(floor)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(act_absmax > 0, s, torch.ones_like(s))
    return s.clamp_min(floor)


def periodic_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, floor: float, period: int | None
) -> torch.Tensor:
    """Scales of length `period` (one per position in a head) or per channel when period is None."""
    if period is None:
        return smoothing_scales(act_absmax, weight_absmax, alpha, floor)
    return smoothing_scales(
        act_absmax.view(-1, period).amax(0), weight_absmax.view(-1, period).amax(0), alpha, floor
    )


def tile_to(s: torch.Tensor, width: int) -> torch.Tensor:
    """A periodic factor vector repeated to `width` channels."""
    return s if s.numel() == width else s.repeat(width // s.numel())


class SmoothQuant(QPass):
    """Migrate activation outliers into the weights, per site, exactly."""

    name = "smooth_quant"

    def _sites(self, view: GraphView) -> tuple[list[tuple[Site, Absorber]], list[SiteNote]]:
        usable, rejected = absorbable_sites(view)
        return usable, [SiteNote(label, False, reason) for label, reason in rejected]

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        kinds = {StatKind.RANGE}
        if self.config.alpha == "auto":
            kinds.add(StatKind.SAMPLES)
        usable, _ = self._sites(view)
        return [StatRequest(site.value, frozenset(kinds)) for site, _ in usable]

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        usable, notes = self._sites(view)
        plan = EditPlan(self.name, notes=notes)
        for site, absorber in usable:
            st = stats[site.value]
            weights = [canonical_weight(view.read(s.weight.const), s.weight) for s in site.sinks]
            w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
            period = absorber.period
            alpha, detail = self._choose_alpha(st, weights, w_absmax, period, ctx)
            s = periodic_scales(st.absmax, w_absmax, alpha, self.config.min_scale, period)
            for sink in site.sinks:
                plan.edits.append(
                    ScaleChannels(
                        sink.weight.const, sink.weight.in_axis, tile_to(s, site.channels), site=site.label
                    )
                )
            for const, axis in absorber.targets:
                factors = 1.0 / tile_to(s, const.shape[axis])
                plan.edits.append(ScaleChannels(const, axis, factors, site=site.label))
            if period:
                detail += f", shared across heads of size {period}"
            ratio = float(st.absmax.max() / st.absmax.median().clamp_min(1e-12))
            plan.notes.append(
                SiteNote(
                    site.label,
                    True,
                    f"alpha={alpha:g}{detail}, outlier ratio {ratio:.1f}x, via {absorber.path}",
                )
            )
        return plan

    def _choose_alpha(
        self, st, weights: list[torch.Tensor], w_absmax: torch.Tensor, period: int | None, ctx: PassContext
    ) -> tuple[float, str]:
        if self.config.alpha != "auto":
            return float(self.config.alpha), ""
        if ctx.activations is None or ctx.weights is None or st.samples is None:
            return 0.5, " (auto without quantization formats: 0.5)"
        x = st.samples[: self.config.search_rows]
        refs = [x @ w.T for w in weights]
        best, best_err = 0.5, float("inf")
        for alpha in self.config.alpha_grid:
            s = periodic_scales(st.absmax, w_absmax, alpha, self.config.min_scale, period)
            s = tile_to(s, st.channels).to(torch.float32)
            rng = (st.min / s).clamp_max(0).min(), (st.max / s).clamp_min(0).max()
            err = sum(
                quantized_output_error(
                    x, w, s, ctx.weights, ctx.activations, (float(rng[0]), float(rng[1])), ref
                )
                for w, ref in zip(weights, refs, strict=True)
            )
            if err < best_err:
                best, best_err = alpha, err
        return best, f" (searched, rel. err {best_err / len(weights):.2e})"
