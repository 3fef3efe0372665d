"""Bias correction (Nagel et al. 2019): undo the mean output shift that weight rounding causes.

A quantized layer computes W_q x instead of W x; over the data its output channel c is shifted
on average by E[(W_q - W) x]_c = sum_j (W_q - W)[c, j] E[x_j]. Rounding errors of one row do not
cancel when the input has a nonzero mean (post-ReLU activations are all positive), so the shift
is systematic, and depthwise convs (9 or 25 weights a row) suffer most. The pass measures the
per-input-channel means E[x_j] on calibration data (channel axis 1 for a conv, last for a
linear), quantizes the weight with the recipe's own weight format exactly as the quantize stage
will, and subtracts the expected shift from the bias (a bias-free layer gets one).

Not equivalent: the FP function changes by design so that the quantized one matches it on
average. It must run last: any later pass that moves weights would change W_q - W.
For a conv, E[x] per channel stands for every kernel tap; zero padding makes border windows read
zeros instead, so the correction is exact for the interior and approximate at the border.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import StatKind, StatRequest, stat_key
from qpass.errors import ConfigError
from qpass.graph.edits import AddBias
from qpass.graph.refs import OpKind, OpRef
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass, Rewrite, SiteList
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig
from qpass.quant.qlinear import canonical_weight, fake_quant_weight


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """min_shift: relative size (|shift| / max |bias or output scale|) below which a layer is left alone."""

    convs: bool = True
    linears: bool = True
    min_shift: float = 0.0


class BiasCorrection(QPass[BiasCorrectionConfig, OpRef]):
    """Fold E[W_q x] - E[W x] (per output channel, from calibration means) out of each layer's bias."""

    name = "bias_correction"
    equivalent = False
    must_run_last = True
    last_reason = "it corrects the rounding of the final weights; a later pass would change them"

    @classmethod
    def check_formats(cls, weights: WeightQuantConfig | None, activations: ActivationQuantConfig | None) -> None:
        if weights is None:
            msg = "recipe key 'passes': bias_correction needs a 'weights' format (it corrects weight rounding)"
            raise ConfigError(msg)

    def _kinds(self) -> frozenset[OpKind]:
        return frozenset(
            ({OpKind.CONV} if self.config.convs else set()) | ({OpKind.LINEAR} if self.config.linears else set())
        )

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[OpRef]:
        found, skipped = [], []
        for op in view.ops(self._kinds()):
            if view.weight(op) is None:
                skipped.append((op.name, f"{op.op_type}: the weight is not a constant"))
            else:
                found.append(op)
        return SiteList(found, skipped)

    def label(self, site: OpRef) -> str:
        return site.name

    @staticmethod
    def _axis(op: OpRef) -> int:
        return 1 if op.kind is OpKind.CONV else -1

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        return [
            StatRequest(view.linear_input(op), frozenset({StatKind.MOMENTS}), channel_axis=self._axis(op))
            for op in self.sites(view, ctx).found
        ]

    def check(self, site: OpRef, view: GraphView, stats, ctx: PassContext) -> str | None:
        if ctx.weights is None:
            return "no weight format: nothing is rounded"
        if ctx.weights.needs_hessian or ctx.weights.mixed is not None:
            return "the weights are chosen by GPTQ / mixed precision at quantize time, not predictable here"
        return None

    def rewrite(self, site: OpRef, view: GraphView, stats, ctx: PassContext) -> Rewrite | str:
        ref = view.weight(site)
        raw = view.read(ref.const)
        w = canonical_weight(raw, ref).to(torch.float32)
        err = fake_quant_weight(w, ctx.weights).to(torch.float32) - w  # [out, in/groups * k...]
        mean = stats[stat_key(view.linear_input(site), self._axis(site))].mean.to(torch.float32)
        if site.kind is OpKind.CONV:
            out, per_group = raw.shape[0], raw.shape[1]
            groups = mean.numel() // per_group
            taps = w.shape[1] // per_group
            # row c reads input channels of its group g = c // (out / groups), each over `taps` taps
            group_of = torch.arange(out) // (out // groups)
            cols = group_of[:, None] * per_group + torch.arange(per_group)[None, :]
            mu = mean[cols].repeat_interleave(taps, dim=1)
        else:
            mu = mean.expand_as(w)
        shift = (err.to(torch.float64) * mu.to(torch.float64)).sum(1)
        scale = float(w.abs().amax()) * float(mean.abs().amax()) or 1.0
        rel = float(shift.abs().max()) / scale
        if rel <= self.config.min_shift or not bool(shift.abs().max() > 0):
            return f"expected shift {rel:.2e} (relative) is below min_shift"
        note = f"bias -= E[(W_q - W) x]: max |shift| {float(shift.abs().max()):.3g} over {shift.numel()} channels"
        return Rewrite([AddBias(site, (-shift).to(torch.float32), site=site.name)], note)
