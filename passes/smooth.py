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

from qpass.calibration import StatKind, Stats
from qpass.errors import ConfigError
from qpass.graph.regions.absorbers import Migration, absorbable_sites
from qpass.graph.regions.migrate import scale_migration, tile_to
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
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


class SmoothQuant(QPass[SmoothQuantConfig, Migration]):
    """Migrate activation outliers into the weights, per site, exactly."""

    name = "smooth_quant"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Migration]:
        return SiteList(*absorbable_sites(view))

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        auto = self.config.alpha == "auto"
        return frozenset({StatKind.RANGE, StatKind.SAMPLES} if auto else {StatKind.RANGE})

    def rewrite(self, site: Migration, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite:
        st = stats[site.site.value]
        weights = [canonical_weight(view.read(s.weight.const), s.weight) for s in site.site.sinks]
        w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        period = site.absorber.period
        alpha, detail = self._choose_alpha(st, weights, w_absmax, period, ctx)
        s = periodic_scales(st.absmax, w_absmax, alpha, self.config.min_scale, period)
        if period:
            detail += f", shared across heads of size {period}"
        ratio = float(st.absmax.max() / st.absmax.median().clamp_min(1e-12))
        note = f"alpha={alpha:g}{detail}, outlier ratio {ratio:.1f}x, via {site.absorber.path}"
        return Rewrite(scale_migration(site, s), note)

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
