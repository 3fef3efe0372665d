"""Rotations of linear inputs: x W^T = (x Q)(W Q)^T for orthogonal Q spreads outlier channels.

Per site (an activation and the linears reading it), Q is folded into the consumers' input
columns and
- offline, into the producer when only linear maps lie between (a producer linear's output
  rows and bias; through attention, a per-head Q shared by all heads: V proj -> o_proj), at
  no run-time cost;
- online, otherwise (`online: true`): an inserted x @ Q op on the edge (e.g. down_proj, whose
  input is an elementwise product), as QuaRot does. For Q = diag(s) H the ±1 signs are folded
  into whatever upstream constant can take a per-channel factor (up_proj's rows through the
  SwiGLU product, a norm's gamma and beta), so the run-time op is the bare H (no sign multiply).
Sites fed by a norm's gamma need norm fusion first and are skipped with that reason.

`layout: residual` (QuaRot) first rotates the whole residual stream offline
(`qpass.graph.regions.residual`),
then rotates the remaining sites as above (down_proj online, V -> o_proj per head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calibration import StatKind, Stats
from qpass.graph.edits import Edit, EditPlan, InsertRotation, RotateChannels, ScaleChannels
from qpass.graph.regions.absorbers import find_absorber
from qpass.graph.regions.residual import plan_residual
from qpass.graph.regions.sites import Site, find_sites
from qpass.graph.view import GraphView
from qpass.math.duquant import duquant_matrix, duquant_rotation
from qpass.math.hadamard import (
    hadamard_block_size,
    hadamard_construction,
    has_hadamard,
    random_signs,
    randomized_hadamard,
)
from qpass.math.rotation import klt_rotation, random_orthogonal
from qpass.pass_base import PassContext, QPass, Rewrite, RotationKind, RotationLayout, SiteList, skipped_notes


@dataclass(frozen=True)
class RotateConfig:
    """kind: the matrix; online: also rotate sites no producer can absorb, with an inserted op.

    With layout residual the stream's Q is a Hadamard matrix for kinds hadamard, klt and duquant
    (their calibrated matrices then go to the remaining sites) and a random one for kind random.
    """

    kind: RotationKind = RotationKind.HADAMARD
    online: bool = True
    seed: int = 0
    block_size: int = 64  # DuQuant rotation blocks (reduced to a divisor of the width)
    layout: RotationLayout = RotationLayout.SITES


def block_diagonal(block: torch.Tensor, width: int) -> torch.Tensor:
    """The same rotation on every head: blockdiag(Q, ..., Q) of size `width`."""
    return torch.block_diag(*([block] * (width // block.shape[0])))


class Rotate(QPass[RotateConfig, Site]):
    """Offline rotation where a producer linear can absorb it, online elsewhere.

    `plan` is overridden for the residual layout only: one rotation shared by the whole residual
    stream is planned first (a global step over all its writers and readers), then the other
    sites go through check -> rewrite as usual.
    """

    name = "rotate"
    _carried: frozenset[str] | set[str] = frozenset()  # linear inputs carrying the stream's rotation

    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[Site]:
        return SiteList(*find_sites(view))

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        kinds = {RotationKind.KLT: {StatKind.XTX, StatKind.MOMENTS}, RotationKind.DUQUANT: {StatKind.RANGE}}
        return frozenset(kinds.get(self.config.kind, ()))

    def _fixed_matrix(self, n: int) -> tuple[torch.Tensor, str]:
        """A calibration-free n x n rotation (Hadamard where one is known) and its construction."""
        return self._matrix(n, None, None, None)

    def _matrix(
        self, n: int, site: Site | None, stats: Stats | None, period: int | None
    ) -> tuple[torch.Tensor, str]:
        """The n x n rotation for a site and the construction used (for the report)."""
        kind, seed = self.config.kind, self.config.seed
        if site is None and kind is not RotationKind.RANDOM:
            kind = RotationKind.HADAMARD
        if kind is RotationKind.HADAMARD:
            if has_hadamard(n):
                return randomized_hadamard(n, seed), f"hadamard {hadamard_construction(n)}"
            block = hadamard_block_size(n)
            if block >= 16:
                blocks = randomized_hadamard(block, seed)
                return block_diagonal(
                    blocks, n
                ), f"block-diagonal hadamard {n // block}x{block} (no order-{n} matrix)"
            return random_orthogonal(n, seed), f"random orthogonal (no Hadamard matrix of order {n})"
        if kind is RotationKind.RANDOM:
            return random_orthogonal(n, seed), "random orthogonal"
        st = stats[site.value]
        if kind is RotationKind.DUQUANT:
            absmax = st.absmax if period is None else st.absmax.view(-1, period).amax(0)
            block = next(b for b in range(min(self.config.block_size, n), 0, -1) if n % b == 0)
            rot = duquant_rotation(absmax, block_size=block, seed=seed)
            return duquant_matrix(rot.perm, rot.rotations), f"duquant blocks of {block}"
        cov = st.xtx / st.count - torch.outer(st.mean, st.mean)
        if period is not None:  # one rotation for all heads: average the per-head covariances
            heads = site.channels // period
            cov = cov.reshape(heads, period, heads, period).diagonal(dim1=0, dim2=2).mean(-1)
        return klt_rotation(cov, with_hadamard=has_hadamard(n)), "klt" + (
            " x hadamard" if has_hadamard(n) else ""
        )

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        listed = self.sites(view, ctx)
        plan = EditPlan(self.name, notes=skipped_notes(listed))
        self._carried = frozenset()
        if self.config.layout is RotationLayout.RESIDUAL:
            stream = plan_residual(view, self._fixed_matrix)
            plan.edits += stream.edits
            plan.notes += stream.notes
            self._carried = stream.covered
        self.plan_sites(plan, listed.found, view, stats, ctx)
        return plan

    def check(self, site: Site, view: GraphView, stats: Stats, ctx: PassContext) -> str | None:
        if site.value.name in self._carried or self.config.online:
            return None
        absorber = find_absorber(view, site.value, site.channels)
        if not isinstance(absorber, str) and absorber.rotatable:
            return None
        why = absorber if isinstance(absorber, str) else "producer scales channels (fuse norms first)"
        return f"offline rotation impossible: {why}"

    def rewrite(self, site: Site, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite:
        if site.value.name in self._carried:
            return Rewrite([], "carries the residual stream's rotation")
        absorber = find_absorber(view, site.value, site.channels)
        offline = not isinstance(absorber, str) and absorber.rotatable
        period = absorber.period if offline else None
        q, construction = self._matrix(period or site.channels, site, stats, period)
        q = q.to(torch.float64)
        full = block_diagonal(q, site.channels) if period else q
        edits: list[Edit] = [
            RotateChannels(sink.weight.const, sink.weight.in_axis, full, site=site.label)
            for sink in site.sinks
        ]
        if offline:
            for const, axis in absorber.targets:
                mat = block_diagonal(q, const.shape[axis]) if period else q
                edits.append(RotateChannels(const, axis, mat, site=site.label))
            how = f"offline via {absorber.path}" + (f", per head of size {period}" if period else "")
        else:
            sink_ops = tuple(s.op for s in site.sinks)
            signs, folded = None, ""
            if self.config.kind is RotationKind.HADAMARD and has_hadamard(q.shape[0]):
                signs = random_signs(q.shape[0], self.config.seed)  # q == diag(signs) @ H
                if not isinstance(absorber, str) and absorber.period is None:
                    # x diag(s) H: the ±1 signs go into the producer (exact), the op is H alone
                    edits += [ScaleChannels(c, axis, signs, site=site.label) for c, axis in absorber.targets]
                    q = q * signs[:, None]
                    signs = torch.ones_like(signs)
                    folded = f", signs folded into {absorber.path}"
            edits.append(
                InsertRotation(
                    site.value, sink_ops, q.to(torch.float32), site=site.label, hadamard_signs=signs
                )
            )
            how = (
                f"online (inserted fast Hadamard transform{folded})"
                if signs is not None
                else "online (inserted x @ Q)"
            )
        return Rewrite(edits, f"{construction} ({q.shape[0]}x{q.shape[0]}) {how}")
