"""Moving a per-channel factor across a site: the sinks' input columns take s, the absorber's
constants take 1/s (tiled to their own width through attention), so the function is unchanged.

Written once for every pass that migrates a factor (smoothing, AWQ, OS+/OutlierTune).
"""

from __future__ import annotations

import torch

from qpass.graph.edits import AddBias, Edit, ScaleChannels
from qpass.graph.regions.absorbers import Migration
from qpass.graph.view import GraphView


def tile_to(s: torch.Tensor, width: int) -> torch.Tensor:
    """A periodic factor vector repeated to `width` channels."""
    return s if s.numel() == width else s.repeat(width // s.numel())


def scale_migration(migration: Migration, s: torch.Tensor) -> list[Edit]:
    """Edits scaling the site's sinks by s and dividing its absorber's constants by s.

    `s` has one factor per channel, or one per head position when the absorber is periodic.
    """
    site, label = migration.site, migration.label
    edits: list[Edit] = [
        ScaleChannels(sink.weight.const, sink.weight.in_axis, tile_to(s, site.channels), site=label)
        for sink in site.sinks
    ]
    edits += [
        ScaleChannels(const, axis, 1.0 / tile_to(s, const.shape[axis]), site=label)
        for const, axis in migration.absorber.targets
    ]
    return edits


def bias_edits_last(view: GraphView, edits: list[Edit]) -> list[Edit]:
    """AddBias edits moved after every scaling, each delta times its linear's output-row factors.

    A bias belongs to the linear's output rows: another site's absorber may scale those rows
    (and an existing bias) by 1/s; a bias added (or created) afterwards must carry the same
    factors, b' = (b + d) * f = b * f + d * f, whatever the order of the sites.
    """
    adds = [e for e in edits if isinstance(e, AddBias)]
    rest = [e for e in edits if not isinstance(e, AddBias)]
    fixed: list[Edit] = []
    for e in adds:
        ref = view.weight(e.op)
        f = torch.ones(ref.out_features, dtype=torch.float64)
        for o in rest:
            if (
                isinstance(o, ScaleChannels)
                and o.const == ref.const
                and o.axis % len(ref.const.shape) == ref.out_axis
            ):
                f = f * o.factors.to(torch.float64).reshape(-1)
        fixed.append(AddBias(e.op, (e.delta.to(torch.float64) * f).to(torch.float32), site=e.site))
    return rest + fixed
