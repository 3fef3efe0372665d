"""Outlier channels of every linear layer: the numbers behind `qpass inspect`.

For each linear layer (found through the GraphView, so ONNX and torch.fx alike) we take the
per-input-channel absmax of its activation (from calibration `Stats`) and of its weight (max
over output channels), and summarise each profile: median, max, kurtosis, and the outlier
channels whose absmax is at least `ratio` times the median. Channels that are outliers in
several layers of the same width are listed as shared (in transformers the same few residual
channels light up in every block). The numbers are computed once here; `report.html` and
`report.json` both render them.

Kurtosis is Pearson's (m4 / m2^2, 3 for a Gaussian) of the per-channel absmax values across
channels: it measures how much a few channels stand out from the rest, which is what a
per-tensor quantization scale suffers from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qpass.calibration import StatRequest, Stats, calibrate
from qpass.graph.refs import OpRef
from qpass.graph.view import GraphView, iter_linear_ops
from qpass.pass_base import PassContext
from qpass.pass_manager import run_passes
from qpass.quant.qlinear import canonical_weight

DEFAULT_RATIO = 6.0  # an outlier channel has absmax >= 6x the median channel's
MAX_LISTED = 16  # outlier channels listed per profile (largest first); the count is always exact


def kurtosis(values: np.ndarray) -> float:
    """Pearson kurtosis m4 / m2^2 of a 1-D array (3 for a Gaussian; 0 for a constant array)."""
    x = np.asarray(values, dtype=np.float64)
    centred = x - x.mean()
    m2 = float(np.mean(centred**2))
    if m2 <= 0.0:
        return 0.0
    return float(np.mean(centred**4) / (m2 * m2))


@dataclass(frozen=True)
class Outlier:
    """One channel whose absmax is `ratio` times the median channel's."""

    channel: int
    absmax: float
    ratio: float


@dataclass
class Profile:
    """Per-input-channel absmax of one tensor, with its summary."""

    absmax: np.ndarray
    ratio_threshold: float = DEFAULT_RATIO

    @property
    def median(self) -> float:
        return float(np.median(self.absmax))

    @property
    def max(self) -> float:
        return float(self.absmax.max())

    @property
    def max_ratio(self) -> float:
        """Max / median: how far the worst channel stands out."""
        return self.max / max(self.median, 1e-12)

    @property
    def kurtosis(self) -> float:
        return kurtosis(self.absmax)

    def outlier_mask(self) -> np.ndarray:
        return self.absmax >= self.ratio_threshold * max(self.median, 1e-12)

    def outliers(self) -> list[Outlier]:
        """Outlier channels, largest first."""
        med = max(self.median, 1e-12)
        idx = np.nonzero(self.outlier_mask())[0]
        idx = idx[np.argsort(-self.absmax[idx], kind="stable")]
        return [Outlier(int(i), float(self.absmax[i]), float(self.absmax[i] / med)) for i in idx]

    def to_dict(self) -> dict[str, Any]:
        outs = self.outliers()
        return {
            "median": self.median,
            "max": self.max,
            "max_ratio": self.max_ratio,
            "kurtosis": self.kurtosis,
            "outlier_count": len(outs),
            "outliers": [vars(o) for o in outs[:MAX_LISTED]],
            "absmax": [float(v) for v in self.absmax],
        }


@dataclass
class LayerState:
    """A linear layer's activation and weight profiles at one moment (before or after the passes)."""

    activation: str
    act: Profile
    weight: Profile

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.activation, "act": self.act.to_dict(), "weight": self.weight.to_dict()}


@dataclass
class LayerEntry:
    """One linear layer: its identity and its state before (and after) the recipe's passes."""

    op: str
    op_type: str
    label: str  # the weight's name without its '.weight' suffix: what a person recognises
    in_features: int
    out_features: int
    before: LayerState
    after: LayerState | None = None

    @property
    def changed(self) -> bool:
        """Whether the passes changed this layer's activation or weight profile."""
        if self.after is None:
            return False
        return not (
            np.allclose(self.before.act.absmax, self.after.act.absmax, rtol=1e-5, atol=0)
            and np.allclose(self.before.weight.absmax, self.after.weight.absmax, rtol=1e-5, atol=0)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "op_type": self.op_type,
            "label": self.label,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "changed": self.changed,
            "before": self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
        }


@dataclass
class SharedOutlier:
    """An activation channel that is an outlier in several layers of the same input width."""

    channel: int
    width: int
    layers: list[str]


@dataclass
class OutlierReport:
    """Everything `qpass inspect` shows, computed once."""

    model: str
    samples: int
    ratio_threshold: float
    layers: list[LayerEntry]
    recipe: str | None = None
    passes: list[str] = field(default_factory=list)  # one summary line per pass run

    def shared(self, when: str = "before") -> list[SharedOutlier]:
        """Activation outlier channels shared by two or more layers (same width), most shared first."""
        by_channel: dict[tuple[int, int], list[str]] = {}
        for layer in self.layers:
            state = layer.before if when == "before" else layer.after
            if state is None:
                continue
            for o in state.act.outliers():
                by_channel.setdefault((layer.in_features, o.channel), []).append(layer.label)
        shared = [SharedOutlier(c, w, names) for (w, c), names in by_channel.items() if len(names) > 1]
        return sorted(shared, key=lambda s: (-len(s.layers), s.width, s.channel))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "recipe": self.recipe,
            "samples": self.samples,
            "outlier_ratio": self.ratio_threshold,
            "kurtosis": "Pearson m4/m2^2 of the per-channel absmax values (3 for a Gaussian)",
            "passes": self.passes,
            "layers": [layer.to_dict() for layer in self.layers],
            "shared_outliers": {"before": [vars(s) for s in self.shared("before")]},
        }
        if self.recipe is not None:
            out["shared_outliers"]["after"] = [vars(s) for s in self.shared("after")]
        return out


def linear_layers(view: GraphView) -> list[OpRef]:
    """The quantizable linear layers (constant weight), in graph order."""
    return list(iter_linear_ops(view))


def collect_stats(view: GraphView, batches: Sequence[Any], *, progress: bool = False) -> Stats:
    """Per-channel ranges of every linear layer's input activation."""
    requests = [StatRequest(view.linear_input(op)) for op in linear_layers(view)]
    return calibrate(view, batches, requests, progress=progress, desc="inspect")


def weight_absmax(view: GraphView, op: OpRef) -> np.ndarray:
    """Per-input-channel absmax of a linear layer's weight (max over output channels)."""
    ref = view.weight(op)
    assert ref is not None  # linear_layers only yields ops with a constant weight
    w = canonical_weight(view.read(ref.const), ref)
    return w.abs().amax(0).to(torch.float64).numpy()


LayerStates = dict[str, tuple[OpRef, LayerState, int, str]]  # op name -> (op, state, out_features, label)


def layer_label(weight_name: str) -> str:
    """'encoder.layer.0.attention.self.query.weight_t' -> 'encoder.layer.0.attention.self.query'."""
    for suffix in (".weight_t", ".weight"):
        if weight_name.endswith(suffix):
            return weight_name[: -len(suffix)]
    return weight_name


def layer_states(view: GraphView, stats: Stats, ratio: float = DEFAULT_RATIO) -> LayerStates:
    """The state of every linear layer, from the graph's weights and calibration `stats`."""
    out = {}
    for op in linear_layers(view):
        value = view.linear_input(op)
        act = Profile(stats[value].absmax.to(torch.float64).numpy(), ratio)
        state = LayerState(value.name, act, Profile(weight_absmax(view, op), ratio))
        ref = view.weight(op)
        assert ref is not None
        out[op.name] = (op, state, ref.out_features, layer_label(ref.const.name))
    return out


def build_report(
    model: str,
    samples: int,
    before: LayerStates,
    after: LayerStates | None = None,
    *,
    ratio: float = DEFAULT_RATIO,
    recipe: str | None = None,
    passes: Sequence[str] = (),
) -> OutlierReport:
    """Pair the before/after states of each layer (by op name) into a report."""
    layers = []
    for name, (op, state, out_features, label) in before.items():
        entry = LayerEntry(name, op.op_type, label, int(state.weight.absmax.shape[0]), out_features, state)
        if after is not None and name in after:
            entry.after = after[name][1]
        layers.append(entry)
    return OutlierReport(model, samples, ratio, layers, recipe, list(passes))


def analyze(
    view: GraphView,
    batches: Sequence[Any],
    *,
    model: str,
    samples: int,
    ratio: float = DEFAULT_RATIO,
    recipe: Any = None,
    verify: bool = True,
    progress: bool = False,
) -> OutlierReport:
    """Profile every linear layer; with a recipe, run its passes (not its quantization) and profile again.

    The view is modified in place when a recipe is given.
    """
    before = layer_states(view, collect_stats(view, batches, progress=progress), ratio)
    after = None
    lines: list[str] = []
    if recipe is not None and recipe.passes:
        ctx = PassContext(recipe.weights, recipe.activations, progress)
        result = run_passes(view, [s.build() for s in recipe.passes], batches, ctx, verify=verify)
        lines = result.summary().splitlines()
        after = layer_states(view, collect_stats(view, batches, progress=progress), ratio)
    report = build_report(
        model,
        samples,
        before,
        after,
        ratio=ratio,
        recipe=None if recipe is None else recipe.name,
        passes=lines,
    )
    return report
