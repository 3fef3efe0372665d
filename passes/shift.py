"""Channel shifting and scaling: Outlier Suppression+ and OutlierTune.

An activation x feeding linears y = W x + b is replaced by x' = (x - z) / s, exactly:
- the producer emits x' (a LayerNorm's beta and gamma, or a producer linear's rows and bias,
  take -z and 1/s; a bias-free producer linear gets a bias),
- every consumer takes W' = W diag(s) and b' = b + W z (a bias is created where none exists).

z = (max + min) / 2 per channel removes the asymmetry of the channel ranges (OS+ shifting,
OutlierTune symmetrization). The scales differ:
- OS+: s_j = max(1, max|x_j - z_j| / t), only channels above the threshold t are scaled,
  t searched to minimise the quantized output error of the consumers on calibration rows;
- OutlierTune: s_j = r_j / max(r), every channel range made equal, so that per-tensor
  quantization of x' equals per-channel quantization of x whose dequantization scales were
  pre-executed into the weights (W diag(s)): per-channel precision at no run-time cost.

A shift needs an additive constant right at the producer; through attention (V -> o_proj)
or an elementwise product there is none, and the site is scaled only, with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qpass.calibration import ChannelStats, StatKind, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import AddBias, EditPlan, ShiftChannels
from qpass.graph.regions.absorbers import Migration, ShiftTarget, absorbable_sites, find_shift_target
from qpass.graph.regions.migrate import bias_edits_last, scale_migration, tile_to
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import canonical_weight, quantized_output_error


@dataclass(frozen=True)
class OSPlusConfig:
    """shift: remove channel asymmetry; scale: suppress channels above a searched threshold."""

    shift: bool = True
    scale: bool = True
    grid: int = 20  # candidate thresholds, quantiles of the channel ranges between 0.5 and 1
    search_rows: int = 256  # calibration rows (a uniform sample) scoring each threshold
    min_scale: float = 1e-5

    def __post_init__(self) -> None:
        if self.grid < 1:
            msg = f"recipe key 'os_plus.grid': must be >= 1, got {self.grid}"
            raise ConfigError(msg)
        if not (self.shift or self.scale):
            msg = "recipe key 'os_plus': 'shift' and 'scale' are both off; the pass would do nothing"
            raise ConfigError(msg)


@dataclass(frozen=True)
class OutlierTuneConfig:
    """symmetrize: shift each channel's range to be symmetric before equalising the ranges."""

    symmetrize: bool = True
    min_scale: float = 1e-5


def channel_shift(st: ChannelStats) -> torch.Tensor:
    """z_j = (max_j + min_j) / 2: the shift that centres every channel's range on zero."""
    return ((st.max.to(torch.float64) + st.min.to(torch.float64)) / 2).to(torch.float32)


def shifted_absmax(st: ChannelStats, z: torch.Tensor) -> torch.Tensor:
    """Max |x_j - z_j| over calibration, from the channel min/max."""
    return torch.maximum((st.max - z).abs(), (st.min - z).abs())


def threshold_scales(absmax: torch.Tensor, t: float, floor: float) -> torch.Tensor:
    """OS+: s_j = max(1, a_j / t) (channels within the threshold are left alone)."""
    return (absmax.to(torch.float64) / t).clamp_min(1.0).clamp_min(floor).to(torch.float32)


def equalizing_scales(absmax: torch.Tensor, floor: float) -> torch.Tensor:
    """OutlierTune: s_j = a_j / max(a), every channel range equal; dead channels keep 1."""
    a = absmax.to(torch.float64)
    top = a.max().clamp_min(1e-30)
    s = torch.where(a > 0, a / top, torch.ones_like(a))
    return s.clamp_min(floor).to(torch.float32)


def periodic_absmax(absmax: torch.Tensor, period: int | None) -> torch.Tensor:
    """Through attention the factor repeats with the head size: the max over heads per position."""
    return absmax if period is None else absmax.view(-1, period).amax(0)


# ------------------------------------------------------------------------------ the passes
class _ShiftScale(QPass[Any, Migration]):
    """Shared rewrite: per site, choose (z, s), then emit the producer and consumer edits."""

    shift_enabled: bool

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Migration]:
        return SiteList(*absorbable_sites(view))

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        return frozenset({StatKind.RANGE})

    def _scales(self, st: ChannelStats, z, weights, period, ctx) -> tuple[torch.Tensor, str]:
        """(s, report detail) for a site whose activation is shifted by z."""
        raise NotImplementedError

    def rewrite(self, site: Migration, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite:
        st = stats[site.site.value]
        target: ShiftTarget | str = "shifting is off"
        if self.shift_enabled:
            target = find_shift_target(view, site.site, site.absorber)
        shifted = isinstance(target, ShiftTarget)
        z = channel_shift(st) if shifted else torch.zeros(st.channels)
        weights = [canonical_weight(view.read(s.weight.const), s.weight) for s in site.site.sinks]
        s, detail = self._scales(st, z, weights, site.absorber.period, ctx)
        edits = scale_migration(site, s)
        shift_note = f"no shift ({target})"
        if shifted:  # after the scaling: the producer emits (x - z) / s
            z64 = z.to(torch.float64)
            for sink, w in zip(site.site.sinks, weights, strict=True):
                edits.append(AddBias(sink.op, (w.to(torch.float64) @ z64).float(), site=site.label))
            if target.const is not None:
                delta = -(z / tile_to(s, site.site.channels))
                edits.append(ShiftChannels(target.const, delta.reshape(target.const.shape), site=site.label))
            else:  # in input units: the row scaling divides it by s like the weight rows
                edits.append(AddBias(target.linear, -z, site=site.label))
            shift_note = f"shift |z| max {float(z.abs().max()):.3g}"
        ratio = float(st.absmax.max() / st.absmax.median().clamp_min(1e-12))
        note = f"{shift_note}; {detail}; outlier ratio {ratio:.1f}x, via {site.absorber.path}"
        return Rewrite(edits, note)

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        """The default plan, then every added bias after all scalings (see `bias_edits_last`)."""
        plan = super().plan(view, stats, ctx)
        plan.edits = bias_edits_last(view, plan.edits)
        return plan


class OutlierSuppressionPlus(_ShiftScale):
    """OS+: shift channels to symmetric ranges, then scale down the channels above a searched threshold."""

    name = "os_plus"

    def __init__(self, config: OSPlusConfig) -> None:
        super().__init__(config)
        self.shift_enabled = config.shift

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        return (
            frozenset({StatKind.RANGE, StatKind.SAMPLES})
            if self.config.scale
            else frozenset({StatKind.RANGE})
        )

    def _scales(self, st: ChannelStats, z, weights, period, ctx) -> tuple[torch.Tensor, str]:
        cfg = self.config
        a = periodic_absmax(shifted_absmax(st, z), period)
        if not cfg.scale:
            return torch.ones_like(a), "no scaling"
        if st.samples is None or st.samples.shape[0] == 0:
            return torch.ones_like(a), "no calibration rows: no scaling"
        wcfg = ctx.weights or WeightQuantConfig()
        acfg = ctx.activations or ActivationQuantConfig()
        x = st.samples[: cfg.search_rows] - z
        refs = [x @ w.T for w in weights]
        qs = (
            torch.linspace(0.5, 1.0, cfg.grid, dtype=torch.float64)
            if cfg.grid > 1
            else torch.ones(1, dtype=torch.float64)
        )
        candidates = sorted({float(torch.quantile(a.to(torch.float64), q)) for q in qs} | {float(a.max())})
        best_t, best_err = float(a.max()), float("inf")
        lo, hi = st.min - z, st.max - z
        for t in candidates:
            if t <= 0:
                continue
            s = tile_to(threshold_scales(a, t, cfg.min_scale), st.channels)
            rng = (float((lo / s).clamp_max(0).min()), float((hi / s).clamp_min(0).max()))
            err = sum(
                quantized_output_error(x, w, s, wcfg, acfg, rng, ref)
                for w, ref in zip(weights, refs, strict=True)
            )
            if err < best_err:
                best_t, best_err = t, err
        s = threshold_scales(a, best_t, cfg.min_scale)
        scaled = int((s > 1).sum())
        return (
            s,
            f"threshold {best_t:.3g} scales {scaled}/{a.numel()} channels (rel. err {best_err / len(weights):.2e})",
        )


class OutlierTune(_ShiftScale):
    """OutlierTune: symmetrize, then equalise channel ranges (per-channel precision, per-tensor cost)."""

    name = "outlier_tune"

    def __init__(self, config: OutlierTuneConfig) -> None:
        super().__init__(config)
        self.shift_enabled = config.symmetrize

    def _scales(self, st: ChannelStats, z, weights, period, ctx) -> tuple[torch.Tensor, str]:
        a = periodic_absmax(shifted_absmax(st, z), period)
        s = equalizing_scales(a, self.config.min_scale)
        return s, f"ranges equalised (scales {float(s.min()):.3g}..{float(s.max()):.3g})"
