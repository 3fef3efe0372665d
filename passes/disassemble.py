"""QLLM channel disassembly: an outlier activation channel becomes T channels of x_c / T.

QLLM (Liu et al., 2024) splits each outlier channel c of a linear's input into T sub-channels
carrying x_c / T and repeats the weight column w_c for each: sum_t (x_c / T) w_c = x_c w_c, so
the function is unchanged while the activation's range (what its quantization scale must
cover) shrinks by T. The split is folded into constants, with no runtime op:

- the producer emits the copies itself: its output rows (and bias) for channel c are repeated
  T times, and on one branch scaled by 1/T. That is exact when the path from the producer
  linear to the activation is linear or positively homogeneous (ReLU(x / T) = ReLU(x) / T);
  an elementwise product (SwiGLU's act(gate) * up) has the copies made on both branches and
  the 1/T on the one that allows it (up). GELU or SiLU on the only branch does not commute
  with 1/T, and a norm producer would change its statistics if a channel were repeated
  (RMSNorm's mean of squares): such sites are skipped with the reason;
- every consumer linear's input column c is repeated T times (ExpandChannels).

T is chosen per channel from calibration: channels whose absmax exceeds a threshold theta get
T_c = ceil(absmax_c / theta). theta is searched per site to minimise a per-tensor
quantization-error proxy, (max_c absmax_c / T_c)^2 x (channels + added), under a budget of
added channels (`max_extra`, a fraction of the width), or fixed (`threshold`, a multiple of
the median channel absmax).

QLLM's assembly step (merge the most similar channel pairs so the width is unchanged) is not
applied: it replaces x_i w_i + x_j w_j by (x_i + x_j) / 2 (w_i + w_j), which is approximate,
and passes here must be exact. The activation and the consumers' inputs grow by the added
channels (reported per site), padded with zero channels to a multiple of the recipe's weight
group (`multiple_of`) so grouped weight quantization still tiles the widened input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import StatRequest, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import Edit, ExpandChannels
from qpass.graph.regions.expand import ExpansionRegion, expansion_site
from qpass.graph.regions.sites import OnSite, find_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList


@dataclass(frozen=True)
class DisassembleConfig:
    """max_extra: added channels per site at most, as a fraction of its width; max_split: T at most;
    threshold: fixed theta as a multiple of the median channel absmax (None: searched per site).
    """

    max_extra: float = 0.1
    max_split: int = 64
    threshold: float | None = None
    multiple_of: int | None = None  # pad the new width with zero channels to a multiple (None: the
    # recipe's weight group, so grouped weight quantization still tiles the widened input)

    def __post_init__(self) -> None:
        if not 0.0 < self.max_extra <= 4.0:
            msg = f"recipe key 'disassemble.max_extra': expected a fraction in (0, 4], got {self.max_extra}"
            raise ConfigError(msg)
        if self.max_split < 2:
            msg = f"recipe key 'disassemble.max_split': must be >= 2, got {self.max_split}"
            raise ConfigError(msg)
        if self.multiple_of is not None and self.multiple_of < 1:
            msg = f"recipe key 'disassemble.multiple_of': must be >= 1, got {self.multiple_of}"
            raise ConfigError(msg)
        if self.threshold is not None and self.threshold <= 1.0:
            msg = f"recipe key 'disassemble.threshold': must be > 1 (x median absmax), got {self.threshold}"
            raise ConfigError(msg)


# ----------------------------------------------------------------------------- the split counts
def proxy_cost(absmax: torch.Tensor, splits: torch.Tensor) -> float:
    """Per-tensor quantization error proxy: squared range after splitting x channel count."""
    a = absmax.to(torch.float64)
    return float((a / splits).max() ** 2 * int(splits.sum()))


def choose_splits(absmax: torch.Tensor, cfg: DisassembleConfig) -> torch.Tensor:
    """T_c per channel (1 = left alone) from the calibrated per-channel absmax."""
    a = absmax.to(torch.float64)
    n = a.numel()
    ones = torch.ones(n, dtype=torch.long)
    budget = int(cfg.max_extra * n)
    if budget < 1:
        return ones

    def splits_for(theta: float) -> torch.Tensor:
        return torch.ceil(a / max(theta, 1e-30)).clamp(1, cfg.max_split).to(torch.long)

    if cfg.threshold is not None:
        t = splits_for(cfg.threshold * float(a.median()))
        extra = int(t.sum()) - n
        return t if extra <= budget else ones
    best, best_cost = ones, proxy_cost(a, ones)
    # theta's breakpoints: where some T_c = ceil(a_c / theta) steps, i.e. theta = a_c / k
    big = a[a > 2 * a.median()]
    ks = torch.arange(1, cfg.max_split + 1, dtype=torch.float64)
    candidates = torch.cat([(big[:, None] / ks[None, :]).reshape(-1), a.max().reshape(1)])
    for theta in torch.sort(candidates, descending=True).values.tolist():
        t = splits_for(theta)
        if int(t.sum()) - n > budget:
            break  # theta only falls from here: more channels
        cost = proxy_cost(a, t)
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def expansion(splits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, scale): channel c stays at c scaled 1/T_c; its T_c - 1 copies are appended."""
    n = splits.numel()
    extra = [c for c in range(n) for _ in range(int(splits[c]) - 1)]
    index = torch.cat([torch.arange(n), torch.tensor(extra, dtype=torch.long)])
    scale = 1.0 / splits[index].to(torch.float64)
    return index, scale


# ----------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class DisassembleSite(OnSite):
    """A linear-input site and the producer region whose channels are repeated with it."""

    region: ExpansionRegion


class Disassemble(QPass[DisassembleConfig, DisassembleSite]):
    """Split outlier input channels of linears into T scaled copies (exact; the width grows)."""

    name = "disassemble"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[DisassembleSite]:
        sites, skipped = find_sites(view)
        listed = SiteList[DisassembleSite]([], skipped)
        for site in sites:
            region = expansion_site(view, site)
            if isinstance(region, str):
                listed.skipped.append((site.label, region))
            else:
                listed.found.append(DisassembleSite(site, region))
        return listed

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        return [StatRequest(s.site.value) for s in self.sites(view, ctx).found]

    def rewrite(
        self, site: DisassembleSite, view: GraphView, stats: Stats, ctx: PassContext
    ) -> Rewrite | str:
        region, label = site.region, site.label
        absmax = stats[site.site.value].absmax.to(torch.float64).reshape(-1)
        splits = choose_splits(absmax, self.config)
        added = int(splits.sum()) - splits.numel()
        if added == 0:
            return "no channel worth splitting within the budget"
        index, scale = expansion(splits)
        multiple = self.config.multiple_of or (ctx.weights.group if ctx.weights and ctx.weights.group else 1)
        pad = (-index.numel()) % multiple
        if pad:  # zero channels: the scaled constants emit 0 there, whatever the consumers read
            index = torch.cat([index, torch.zeros(pad, dtype=torch.long)])
            scale = torch.cat([scale, torch.zeros(pad, dtype=torch.float64)])
        added = index.numel() - splits.numel()
        values = tuple(dict.fromkeys(region.values))
        unique = {c.name: (c, a) for c, a in region.repeat}
        edits: list[Edit] = []
        for name, (const, axis) in unique.items():
            factors = scale if name in region.scaled else None
            edits.append(ExpandChannels(const, axis, index, factors, values, site=label))
        for sink in site.site.sinks:
            w = sink.weight
            edits.append(ExpandChannels(w.const, w.in_axis, index, None, values, site=label))
        split = int((splits > 1).sum())
        before, after = float(absmax.max()), float((absmax / splits).max())
        detail = (
            f"{split} outlier channels split into {int(splits[splits > 1].sum())} "
            f"(T up to {int(splits.max())}{f', {pad} zero channels' if pad else ''}); "
            f"width {splits.numel()} -> {splits.numel() + added} "
            f"(+{added}, no assembly: QLLM's merge is approximate); absmax {before:.3g} -> {after:.3g}"
        )
        return Rewrite(edits, detail)
