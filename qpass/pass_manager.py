"""Runs a recipe's passes in order; in verify mode checks each equivalent pass numerically.

Before running, the passes' declared requirements are checked (`check_pass_order`): a pass
that must run last, and the quantization formats a pass needs downstream.

Verification runs the calibration's verification feeds (`qpass.data.verification_feeds`: every
explicit feed, and the first batch of data split into batches) before and after the pass and
compares every graph output on each of them, with the one tolerance, by max relative error
(max |after - before| / max |before| over finite entries; infinite and NaN entries must be the
same before and after). A pass that breaks equivalence is an error naming the pass and the
feed; when its edits only touch constants, the graph is restored and the first failing site is
named.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qpass.calibration import Stats, calibrate
from qpass.data import verification_feeds
from qpass.errors import ConfigError, PassError
from qpass.graph.edits import CONSTANT_EDITS, EditPlan
from qpass.graph.refs import ConstRef
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass

log = logging.getLogger("qpass")


@dataclass
class PassResult:
    """What one pass did: its plan (edits and per-site notes) and the measured equivalence error."""

    name: str
    plan: EditPlan
    max_rel_error: float | None = None

    @property
    def changed(self) -> bool:
        return bool(self.plan.edits)


@dataclass
class PassReport:
    results: list[PassResult] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for r in self.results:
            line = r.plan.summary()
            if r.max_rel_error is not None:
                line += f" [verified: max rel err {r.max_rel_error:.1e}]"
            lines.append(line)
        return "\n".join(lines)


_CHUNK = 1 << 22  # elements compared at a time: a big LM's logits never get a float64 twin


def max_relative_error(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """Max over outputs of max|a - b| / max|b| over finite entries (float outputs only).

    Non-finite entries (an output that carries a -inf mask, say) must be identical in both: same
    positions, same infinities, NaN where NaN; anything else is an infinite error. Compared in
    float64 a chunk at a time, so the check of a 150k-vocabulary LM's logits costs megabytes, not
    twice the logits.
    """
    worst = 0.0
    for b, a in zip(before, after, strict=True):
        if not torch.is_floating_point(b):
            if not torch.equal(a, b):
                return float("inf")
            continue
        if a.shape != b.shape:
            return float("inf")
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        err = denom = 0.0
        for start in range(0, flat_b.numel(), _CHUNK):
            a64 = flat_a[start : start + _CHUNK].to(torch.float64)
            b64 = flat_b[start : start + _CHUNK].to(torch.float64)
            finite = torch.isfinite(b64)
            if not torch.equal(torch.isfinite(a64), finite):
                return float("inf")
            if not bool(finite.all()):
                x, y = a64[~finite], b64[~finite]
                if not bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all()):
                    return float("inf")
                a64, b64 = a64[finite], b64[finite]
            if b64.numel():
                denom = max(denom, float(b64.abs().max()))
                err = max(err, float((a64 - b64).abs().max()))
        worst = max(worst, err / max(denom, 1e-12))
    return worst


def feeds_error(
    view: GraphView, feeds: Sequence[Any], before: Sequence[Sequence[torch.Tensor]]
) -> tuple[float, int]:
    """The worst max relative error over the feeds, and the index of the feed that gave it."""
    worst, at = 0.0, 0
    for i, (feed, ref) in enumerate(zip(feeds, before, strict=True)):
        err = max_relative_error(ref, view.run(feed))
        if err > worst:
            worst, at = err, i
    return worst, at


def _touched(plan: EditPlan) -> list[ConstRef]:
    return list({e.const.name: e.const for e in plan.edits if isinstance(e, CONSTANT_EDITS)}.values())


def _subplan(plan: EditPlan, site: str) -> EditPlan:
    return EditPlan(plan.pass_name, [e for e in plan.edits if e.site == site])


def run_pass(
    view: GraphView,
    qpass: QPass,
    batches: Sequence[Any],
    ctx: PassContext,
    *,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> PassResult:
    """Calibrate what the pass asks for, plan, apply, and (for equivalent passes) verify."""
    requests = qpass.stat_requests(view, ctx)
    stats = (
        calibrate(view, batches, requests, progress=ctx.progress, desc=qpass.name) if requests else Stats()
    )
    plan = qpass.plan(view, stats, ctx)
    result = PassResult(qpass.name, plan)
    check = verify and qpass.equivalent and plan.edits
    feeds = verification_feeds(batches) if check else []
    before = [view.run(f) for f in feeds]
    snapshot = {c.name: (c, view.read(c)) for c in _touched(plan)} if check else {}
    view.apply(plan)
    if check:
        err, at = feeds_error(view, feeds, before)
        result.max_rel_error = err
        if err > tolerance:
            site, site_err = None, 0.0
            if all(isinstance(e, CONSTANT_EDITS) for e in plan.edits):  # undoable: bisect by site
                site, site_err = _first_failing_site(view, plan, snapshot, feeds, before, tolerance)
                for const, tensor in snapshot.values():
                    view.write(const, tensor)
                view.invalidate()
            where = f" at site '{site}' (max rel err {site_err:.2e} alone)" if site else ""
            on = f" on verification feed {at} of {len(feeds)}" if len(feeds) > 1 else ""
            msg = (
                f"pass '{qpass.name}' changed the model's function: max rel err {err:.2e} > "
                f"{tolerance:g}{on}{where}"
            )
            raise PassError(msg)
    log.info("%s", plan.summary())
    return result


def _first_failing_site(view, plan, snapshot, feeds, before, tolerance) -> tuple[str | None, float]:
    """Restore the graph, then re-apply site by site to find the first that breaks equivalence."""
    for const, tensor in snapshot.values():
        view.write(const, tensor)
    view.invalidate()
    sites = list(dict.fromkeys(e.site for e in plan.edits))
    try:
        for site in sites:
            view.apply(_subplan(plan, site))
            err, _ = feeds_error(view, feeds, before)
            if err > tolerance:
                return site, err
    finally:
        for const, tensor in snapshot.values():
            view.write(const, tensor)
    return None, 0.0


def check_pass_order(passes: Sequence[QPass], ctx: PassContext) -> None:
    """Enforce what each pass declares: `must_run_last`, then its `check_formats` (a `ConfigError`)."""
    for index, p in enumerate(passes):
        if p.must_run_last and index != len(passes) - 1:
            msg = (
                f"recipe key 'passes[{index}]': {p.name} must be the last pass ({p.last_reason}); "
                f"found '{passes[index + 1].name}' after it"
            )
            raise ConfigError(msg)
        p.check_formats(ctx.weights, ctx.activations)


def run_passes(
    view: GraphView,
    passes: Sequence[QPass],
    batches: Sequence[Any],
    ctx: PassContext,
    *,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> PassReport:
    check_pass_order(passes, ctx)
    report = PassReport()
    for p in passes:
        report.results.append(run_pass(view, p, batches, ctx, verify=verify, tolerance=tolerance))
    return report
