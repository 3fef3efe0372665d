"""SplitQuant: split a linear into parts by clustering its weight values, so each part gets
its own quantization scales.

Per layer, 1-D k-means over the weight values gives lower / middle / upper clusters (k = 3 by
default). Part i keeps the weights of cluster i and zeros elsewhere, so the parts sum to W
exactly and y = sum_i x W_i^T + b is the same function. Quantized per output row, the middle
part (most weights) gets a scale no longer set by the extreme values, and the extreme parts
are mostly zeros, which every symmetric grid represents exactly. The bias stays with the
middle part (it is not quantized).

The adapters emit the parts as one linear over the concatenated rows followed by an
unflatten and a sum (`SplitOp`): one kernel launch instead of k, and the existing lowering
quantizes that linear per row, i.e. each part with its own scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import Stats
from qpass.errors import ConfigError
from qpass.graph.edits import SplitOp
from qpass.graph.refs import OpKind, OpRef
from qpass.graph.view import GraphView, iter_linear_ops
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.quant.qlinear import canonical_weight


@dataclass(frozen=True)
class SplitQuantConfig:
    """parts: clusters per layer; min_in_features: smaller layers are left alone."""

    parts: int = 3
    iters: int = 25  # Lloyd iterations of the 1-D k-means
    min_in_features: int = 16
    skip_last: bool = False  # keep the last linear (often an output head) whole

    def __post_init__(self) -> None:
        if not 2 <= self.parts <= 8:
            msg = f"recipe key 'split_quant.parts': expected 2..8 parts, got {self.parts}"
            raise ConfigError(msg)
        if self.iters < 1:
            msg = f"recipe key 'split_quant.iters': must be >= 1, got {self.iters}"
            raise ConfigError(msg)


def kmeans_1d(values: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars, initialised at quantiles; returns (labels, sorted centroids).

    One dimension and k <= 8: a few vectorised lines, not worth a scikit-learn dependency.
    Labels are ordered by centroid (0 = lowest cluster).
    """
    v = values.flatten().to(torch.float64)
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k, dtype=torch.float64)
    sample = (
        v
        if v.numel() <= 1_000_000
        else v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    )
    centroids = torch.quantile(sample, qs)
    for _ in range(iters):
        labels = (v[:, None] - centroids[None, :]).abs().argmin(1)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, v)
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.allclose(new, centroids):
            break
        centroids = new
    order = torch.argsort(centroids)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    labels = rank[(v[:, None] - centroids[None, :]).abs().argmin(1)]
    return labels.reshape(values.shape), centroids[order]


def split_weight(w: torch.Tensor, k: int, iters: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The k cluster parts of `w` (zeros outside each cluster; they sum to `w`) and centroids."""
    labels, centroids = kmeans_1d(w, k, iters)
    return [torch.where(labels == i, w, torch.zeros_like(w)) for i in range(k)], centroids


class SplitQuant(QPass[SplitQuantConfig, OpRef]):
    """Replace each linear by k weight-cluster parts summed (exact in FP)."""

    name = "split_quant"

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[OpRef]:
        ops = [op for op in iter_linear_ops(view) if op.kind is OpKind.LINEAR]
        if self.config.skip_last and ops:
            return SiteList(ops[:-1], [(ops[-1].name, "last linear kept whole (skip_last)")])
        return SiteList(ops)

    def label(self, site: OpRef) -> str:
        return site.name

    def check(self, site: OpRef, view: GraphView, stats: Stats, ctx: PassContext) -> str | None:
        ref = view.weight(site)
        users = view.const_users(ref.const)
        if users != 1:
            return f"weight '{ref.const.name}' is shared by {users} ops"
        if view.shape(view.linear_input(site)) is None:  # the summed parts need the input's rank
            return "input has no known shape (rank) to split over"
        if ref.in_features < self.config.min_in_features:
            return f"{ref.in_features} input features < min_in_features"
        return None

    def rewrite(self, site: OpRef, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite | str:
        cfg, ref = self.config, view.weight(site)
        w = canonical_weight(view.read(ref.const), ref).to(torch.float32)
        parts, centroids = split_weight(w, cfg.parts, cfg.iters)
        if sum(bool(p.any()) for p in parts) < 2:
            return "weights form a single cluster"
        bias = view.read(ref.bias).to(torch.float32) if ref.bias is not None else None
        biases = tuple(bias if i == cfg.parts // 2 else None for i in range(cfg.parts))
        ranges = ", ".join(f"{float(p[p != 0].abs().max()) if p.any() else 0.0:.3g}" for p in parts)
        detail = (
            f"{cfg.parts} parts, centroids {[round(float(c), 4) for c in centroids]}, "
            f"part absmax {ranges} (whole {float(w.abs().max()):.3g})"
        )
        return Rewrite([SplitOp(site, tuple(parts), biases, site=site.name)], detail)
