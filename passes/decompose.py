"""LLM.int8()-style outlier decomposition: a few input channels of a linear stay in float.

    y = dequant(Q_tok(x[:, N]) @ Q(W[:, N])^T) + x[:, O] @ W[:, O]^T + b

O is a fixed set of outlier input channels chosen from calibration, N the others. The per-token
activation scales (and the per-channel weight scales) are computed over N only, so a massive
channel no longer coarsens every other value of its token. LLM.int8 finds O per batch at run
time; here it is fixed once per activation (every linear reading the activation gets the same
set), which gives static shapes to the kernels and the ONNX graph.

Which channels (`Int8DecomposeConfig`, exactly one criterion):
- `threshold` (the default, 6.0, LLM.int8's value): calibrated max |x| >= threshold. It is
  absolute, so it suits the inputs of pre-norm transformer linears whose normal features are
  O(1) and is the paper's published rule;
- `top_k`: the k largest channels by max |x| (a fixed float budget, e.g. for a kernel);
- `ratio`: max |x| >= ratio * the median channel's max |x| (scale-free, for models whose
  activations are not O(1)).
At most `max_fraction` of a layer's channels go float (the largest ones): a layer whose inputs
are all large (e.g. an un-normalised input) would otherwise run entirely in float.

The pass itself changes nothing in the graph: it records the choice with a `KeepFloatChannels`
annotation per linear (verified to leave the FP function unchanged, as any pass), and
`plan_quantization` builds the split layer (`decomposed_qlinear`). Lowering: torch
`DecomposedQuantLinear` (`qpass::int8_decomp_gemm`: Triton on CUDA, `torch._int_mm` on CPU),
ONNX Gather + per-token MatMulInteger (u8 x s8) + Gather + MatMul + Add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import StatKind, StatRequest, Stats
from qpass.errors import ConfigError
from qpass.graph.edits import KeepFloatChannels
from qpass.graph.refs import OpKind, OpRef
from qpass.graph.view import GraphView, iter_linear_ops
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig
from qpass.quant.decompose import check_formats

DEFAULT_THRESHOLD = 6.0  # LLM.int8 (Dettmers et al., 2022): |x| >= 6 marks an outlier feature


@dataclass(frozen=True)
class Int8DecomposeConfig:
    """Which input channels stay float: `threshold` (default 6.0) | `top_k` | `ratio`; at most
    `max_fraction` of a layer's channels.
    """

    threshold: float | None = None
    top_k: int | None = None
    ratio: float | None = None
    max_fraction: float = 0.1

    def __post_init__(self) -> None:
        given = [k for k in ("threshold", "top_k", "ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            msg = (
                f"recipe key 'int8_decompose.{given[1]}': give one of threshold | top_k | ratio, got {given}"
            )
            raise ConfigError(msg)
        if self.threshold is not None and not self.threshold > 0:
            msg = f"recipe key 'int8_decompose.threshold': must be > 0, got {self.threshold}"
            raise ConfigError(msg)
        if self.top_k is not None and self.top_k < 1:
            msg = f"recipe key 'int8_decompose.top_k': must be >= 1, got {self.top_k}"
            raise ConfigError(msg)
        if self.ratio is not None and not self.ratio > 1:
            msg = (
                f"recipe key 'int8_decompose.ratio': must be > 1 (times the median channel), got {self.ratio}"
            )
            raise ConfigError(msg)
        if not 0 < self.max_fraction <= 0.5:
            msg = f"recipe key 'int8_decompose.max_fraction': must be in (0, 0.5], got {self.max_fraction}"
            raise ConfigError(msg)

    @property
    def criterion(self) -> str:
        if self.top_k is not None:
            return f"top_k {self.top_k}"
        if self.ratio is not None:
            return f"max|x| >= {self.ratio:g} x median"
        return f"max|x| >= {self.threshold if self.threshold is not None else DEFAULT_THRESHOLD:g}"


def select_channels(absmax: torch.Tensor, cfg: Int8DecomposeConfig) -> tuple[torch.Tensor, str]:
    """Sorted int64 indices of the outlier channels of one activation, and what decided them."""
    k = absmax.numel()
    cap = max(1, int(cfg.max_fraction * k))
    order = torch.argsort(absmax, descending=True, stable=True)
    if cfg.top_k is not None:
        n = cfg.top_k
    elif cfg.ratio is not None:
        n = int((absmax >= cfg.ratio * absmax.median()).sum())
    else:
        t = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLD
        n = int((absmax >= t).sum())
    why = cfg.criterion
    if n > cap:
        why += f", capped at max_fraction {cfg.max_fraction:g} ({n} -> {cap})"
        n = cap
    return torch.sort(order[:n]).values.to(torch.int64), why


class Int8Decompose(QPass[Int8DecomposeConfig, OpRef]):
    """Record, per linear, the input channels that quantization keeps in float (FP function unchanged).

    One choice per activation, shared by the linears reading it (the same statistics give the
    same channels). Declared: it must run last (later passes would move the chosen channels)
    and the recipe's formats must be ones a decomposed layer supports.
    """

    name = "int8_decompose"
    must_run_last = True
    last_reason = "later passes would move the channels it chose"

    @classmethod
    def check_formats(
        cls, weights: WeightQuantConfig | None, activations: ActivationQuantConfig | None
    ) -> None:
        check_formats(weights, activations)

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[OpRef]:
        return SiteList([op for op in iter_linear_ops(view) if op.kind is OpKind.LINEAR])

    def label(self, site: OpRef) -> str:
        return site.name

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        inputs = dict.fromkeys(view.linear_input(op) for op in self.sites(view, ctx).found)
        return [StatRequest(v, frozenset({StatKind.RANGE})) for v in inputs]

    def check(self, site: OpRef, view: GraphView, stats: Stats, ctx: PassContext) -> str | None:
        ref = view.weight(site)
        if len(ref.const.shape) != 2:
            return f"{len(ref.const.shape)}-D weight: not a plain linear"
        absmax = stats[view.linear_input(site)].absmax
        if absmax.numel() != ref.in_features:
            return f"{absmax.numel()} input channels vs {ref.in_features} weight inputs"
        return None

    def rewrite(self, site: OpRef, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite | str:
        ref = view.weight(site)
        absmax = stats[view.linear_input(site)].absmax
        channels, why = select_channels(absmax, self.config)
        if channels.numel() == 0:
            return f"no outlier channel ({why}; largest {float(absmax.max()):.3g})"
        shown = channels.tolist()[:8]
        more = f" (+{channels.numel() - 8})" if channels.numel() > 8 else ""
        detail = (
            f"{channels.numel()}/{ref.in_features} channels float {shown}{more}: {why}; "
            f"their max|x| {float(absmax[channels].min()):.3g}..{float(absmax[channels].max()):.3g}, "
            f"the rest <= {_rest_max(absmax, channels):.3g}"
        )
        return Rewrite([KeepFloatChannels(site, channels, site=site.name)], detail)


def _rest_max(absmax: torch.Tensor, channels: torch.Tensor) -> float:
    rest = torch.ones(absmax.numel(), dtype=torch.bool)
    rest[channels] = False
    return float(absmax[rest].max()) if rest.any() else 0.0
