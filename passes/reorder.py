"""Channel reordering for block formats ("Accurate Block Quantization in LLMs with Outliers").

A block format (MXFP4, NVFP4, BFP, INT groups) shares one scale per block of consecutive
channels of a reduction dimension; one outlier channel inflates the scale of its whole block.
Reordering the channels so outliers share blocks leaves the other blocks with small scales.
The permutation is folded into constants at compile time, so the graph gains no op:

- linear inputs: the consumers' input columns and the producer's output rows (and bias) are
  permuted with the same permutation. The producer may be a linear, reached through
  elementwise ops (GELU, SiLU, the SwiGLU product: every branch is permuted), per-channel
  constants, or attention (V -> o_proj: one permutation inside a head, repeated per head).
  A norm output is skipped: its channels are the residual stream's, which every block
  reads and writes.
- the K cache: the head dimension of W_q and W_k (and their biases) is permuted together,
  so Q K^T is unchanged and K is produced, and cached, in the reordered layout. A path with
  anything but head-layout ops (reshape, transpose, GQA repeat, a scalar scale) between the
  projections and Q K^T is skipped with a reason: RoPE's rotate_half pairs dims i and
  i + d/2, which a free permutation would break.

Head sites (K cache, V -> o_proj) get one permutation per head when every constant of the
site has as many heads as the activation (multi-head attention: head h of the producer is
head h of the consumer under the head split/merge reshapes): LLMs' outlier channels sit at
different positions in different heads, and one shared permutation could not cluster them
all. Under GQA (fewer K/V heads than Q heads) one permutation is shared by all heads, chosen
from the largest magnitude over heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import ChannelStats, StatKind, Stats
from qpass.errors import ConfigError, PassError
from qpass.graph.edits import PermuteChannels
from qpass.graph.regions.permute import PermutableSite, k_cache_sites, linear_input_site
from qpass.graph.regions.sites import find_sites
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, ReorderKey, ReorderMethod, Rewrite, SiteList
from qpass.quant.qlinear import canonical_weight


@dataclass(frozen=True)
class ReorderConfig:
    """block: the format's block size; what to reorder: linear inputs and/or the K cache."""

    block: int = 32
    method: ReorderMethod = ReorderMethod.SORT
    key: ReorderKey = ReorderKey.RMS
    linear_inputs: bool = True
    k_cache: bool = True
    outlier_ratio: float = 4.0  # a channel above this multiple of the median is an outlier (both methods)
    per_head: bool = True  # head sites: one permutation per head where the head counts agree

    def __post_init__(self) -> None:
        if self.block < 2:
            msg = f"recipe key 'reorder.block': must be an integer >= 2, got {self.block}"
            raise ConfigError(msg)
        if self.outlier_ratio <= 1.0:
            msg = f"recipe key 'reorder.outlier_ratio': must be > 1, got {self.outlier_ratio}"
            raise ConfigError(msg)
        if not (self.linear_inputs or self.k_cache):
            msg = "recipe key 'reorder': 'linear_inputs' and 'k_cache' are both false; nothing to reorder"
            raise ConfigError(msg)


# ----------------------------------------------------------------------------- permutations
def sort_permutation(key: torch.Tensor, block: int | None = None, ratio: float | None = None) -> torch.Tensor:
    """perm[i] = the channel stored at position i: channels by descending magnitude (stable).

    With `block` and `ratio`: the outliers (key > ratio x median) first, then, in the free slots
    of their last block, the smallest channels rather than the next largest: whatever shares a
    block with an outlier is quantized with the outlier's scale (small values round to zero, an
    error of their own size), so the channels that lose least should be the ones there.
    """
    k = key.to(torch.float64)
    order = torch.argsort(-k, stable=True)
    if block is None or ratio is None:
        return order
    n_out = int((k > ratio * k.median().clamp_min(1e-30)).sum())
    free = (-n_out) % block
    if n_out == 0 or free == 0 or n_out + free > k.numel():
        return order
    rest = order[n_out:]
    return torch.cat([order[:n_out], rest[rest.numel() - free :], rest[: rest.numel() - free]])


def balance_permutation(key: torch.Tensor, block: int, ratio: float) -> torch.Tensor:
    """Pack the outlier channels (key > ratio x median) into the fewest blocks, moving as few
    channels as possible: the blocks already holding most outliers receive the rest, and the
    normal channels they displace take the outliers' old positions.
    """
    n = key.numel()
    key = key.to(torch.float64)
    outliers = set(torch.nonzero(key > ratio * key.median().clamp_min(1e-30)).flatten().tolist())
    perm = list(range(n))
    if not outliers:
        return torch.tensor(perm)
    blocks = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    counts = [sum(c in outliers for c in b) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda b: (-counts[b], b))
    dest: list[int] = []
    for b in order:
        if len(dest) >= len(outliers):
            break
        dest += sorted(blocks[b], key=lambda c: c not in outliers)  # outliers keep their slot
    dest_set = set(dest[: len(outliers)])
    # outliers outside the destination slots swap with normal channels inside them
    movers = sorted((c for c in outliers if c not in dest_set), key=lambda c: -key[c])
    free = [p for p in dest[: len(outliers)] if p not in outliers]
    for src, dst in zip(movers, free, strict=True):
        perm[src], perm[dst] = perm[dst], perm[src]
    return torch.tensor(perm)


def tile_permutation(perm: torch.Tensor, width: int) -> torch.Tensor:
    """The same permutation inside each consecutive group of len(perm) channels (per head)."""
    period = perm.numel()
    return torch.cat([h * period + perm for h in range(width // period)])


def head_permutation(perms: list[torch.Tensor], width: int) -> torch.Tensor:
    """Head h of a `width`-wide axis takes perms[h]; one permutation is tiled over every head."""
    if len(perms) == 1:
        return tile_permutation(perms[0], width)
    period = perms[0].numel()
    if width != period * len(perms):
        msg = f"{len(perms)} head permutations of {period} do not cover {width} channels"
        raise PassError(msg)
    return torch.cat([h * period + p for h, p in enumerate(perms)])


def blocks_max_mse_proxy(key: torch.Tensor, perm: torch.Tensor, block: int) -> float:
    """Sum over blocks of (block max)^2 x block length: what a shared scale costs (for reports)."""
    k = key.to(torch.float64)[perm]
    return float(
        sum(k[s : s + block].max() ** 2 * k[s : s + block].numel() for s in range(0, k.numel(), block))
    )


def weight_key(view: GraphView, site: PermutableSite) -> torch.Tensor:
    """Per-channel magnitude from weights (key 'weight'): the consumers' input columns of a linear
    input, the K projection's output rows of a K cache site.
    """
    if site.what == "K cache":
        (k_w,) = site.key_weights
        return view.read(k_w.const).abs().amax(k_w.in_axis)
    cols = [canonical_weight(view.read(w.const), w).abs().amax(0) for w in site.key_weights]
    return torch.stack(cols).amax(0)


def channel_key(kind: ReorderKey, stats: ChannelStats) -> torch.Tensor:
    """Per-channel magnitude from calibration statistics (key 'activation' or 'rms').

    RMS, not absmax, is what sets a channel's share of a block's error: the block scale follows
    each token's block max, and absmax ranks channels by one extreme token (heavy-tailed MLP
    activations: absmax/RMS 4-8), so absmax-sorted blocks mix channels of different typical size.
    """
    if kind is ReorderKey.RMS:
        if stats.sumsq is None:
            msg = "reorder key 'rms' needs calibration moments (StatKind.MOMENTS)"
            raise PassError(msg)
        return (stats.sumsq / max(stats.count, 1)).sqrt()
    return stats.absmax


# ----------------------------------------------------------------------------- the pass
class Reorder(QPass[ReorderConfig, PermutableSite]):
    """Permute reduction channels so outliers share blocks; folded into constants (no new op)."""

    name = "reorder"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[PermutableSite]:
        block = self.config.block
        candidates: list[PermutableSite | tuple[str, str]] = []
        if self.config.linear_inputs:
            sites, rejected = find_sites(view)
            candidates += rejected
            for site in sites:
                found = linear_input_site(view, site)
                candidates.append((site.label, found) if isinstance(found, str) else found)
        if self.config.k_cache:
            ksites, krejected = k_cache_sites(view)
            candidates += krejected + ksites
        listed = SiteList[PermutableSite]()
        for c in candidates:
            if isinstance(c, tuple):
                listed.skipped.append(c)
            elif c.period <= block:
                why = (
                    f"{c.width} channels fit in one block of {block}"
                    if c.period == c.width
                    else f"heads of size {c.period} fit in one block of {block}: "
                    "reordering inside a head cannot change the blocks"
                )
                listed.skipped.append((c.label, why))
            else:
                listed.found.append(c)
        return listed

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        if self.config.key is ReorderKey.WEIGHT:
            return frozenset()
        return frozenset(
            {StatKind.RANGE} | ({StatKind.MOMENTS} if self.config.key is ReorderKey.RMS else set())
        )

    def _keys(self, site: PermutableSite, view: GraphView, stats: Stats) -> torch.Tensor:
        """[heads, period] magnitudes: one row per permutation to choose (one row if shared)."""
        if self.config.key is ReorderKey.WEIGHT:
            key = weight_key(view, site)
        else:
            key = channel_key(self.config.key, stats[site.value])
        key = key.to(torch.float64).reshape(-1, site.period)
        tiles = {const.shape[axis] // site.period for const, axis in (*site.sinks, *site.sources)}
        if self.config.per_head and tiles == {key.shape[0]}:
            return key
        return key.amax(0, keepdim=True)

    def rewrite(self, site: PermutableSite, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite | str:
        cfg = self.config
        keys = self._keys(site, view, stats)
        choose = sort_permutation if cfg.method is ReorderMethod.SORT else balance_permutation
        perms = [choose(k, cfg.block, cfg.outlier_ratio) for k in keys]
        ident = torch.arange(site.period)
        if all(torch.equal(p, ident) for p in perms):
            return "channels already in the chosen order"
        before = sum(blocks_max_mse_proxy(k, ident, cfg.block) for k in keys)
        after = sum(blocks_max_mse_proxy(k, p, cfg.block) for k, p in zip(keys, perms, strict=True))
        edits = [
            PermuteChannels(const, axis, head_permutation(perms, const.shape[axis]), site=site.label)
            for const, axis in (*site.sinks, *site.sources)
        ]
        moved = sum(int((p != ident).sum()) for p in perms)
        head = ""
        if site.period != site.width:
            head = f", per head of size {site.period}" + (
                f" ({len(perms)} permutations)" if len(perms) > 1 else " (one shared permutation)"
            )
        return Rewrite(
            edits,
            f"{site.what}: {cfg.method.value} moved {moved}/{site.period * len(perms)} channels{head}; "
            f"block-scale cost {before / max(after, 1e-30):.2f}x lower",
        )
