"""The pass contract: a pass asks for statistics, then returns an `EditPlan` (plain data).

A pass reads as match -> check -> rewrite (as onnxscript's rewrite rules, torch.fx's PassBase):
`sites` lists the candidate sites from graph structure (with the reasons for those rejected on
the way), `check` may still skip one (a reason) and `rewrite` gives its edits and report line,
or a reason when the computed rewrite would change nothing. The default `plan` loops over them
and records a `SiteNote` for every site. What a pass requires of the recipe (its place in the
pass order, the quantization formats) is declared on the class and checked by the pass manager.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from qpass.calibration import StatKind, StatRequest, Stats
from qpass.graph.edits import Edit, EditPlan, SiteNote
from qpass.graph.view import GraphView
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig

ConfigT = TypeVar("ConfigT")
SiteT = TypeVar("SiteT")


@dataclass(frozen=True)
class PassContext:
    """What a pass may know beyond the graph: the recipe's target formats (for error-driven searches)."""

    weights: WeightQuantConfig | None = None
    activations: ActivationQuantConfig | None = None
    progress: bool = False


@dataclass
class SiteList(Generic[SiteT]):
    """Candidate sites, and (label, reason) for the places rejected while matching."""

    found: list[SiteT] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Rewrite:
    """The edits for one site and the line the report shows for it."""

    edits: list[Edit]
    detail: str


class QPass(Generic[ConfigT, SiteT]):
    """A graph rewrite. `equivalent` passes must leave the FP function unchanged (verified).

    Declared requirements, checked by `qpass.pass_manager.check_pass_order`:
    `must_run_last` (with `last_reason`, why later passes would undo it) and `check_formats`.
    """

    name: ClassVar[str]
    equivalent: ClassVar[bool] = True
    must_run_last: ClassVar[bool] = False
    last_reason: ClassVar[str] = ""

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @classmethod
    def check_formats(
        cls, weights: WeightQuantConfig | None, activations: ActivationQuantConfig | None
    ) -> None:
        """Raise `ConfigError` when the recipe's formats cannot follow this pass (any by default)."""

    # ------------------------------------------------------------------ match -> check -> rewrite
    def sites(self, view: GraphView, ctx: PassContext) -> SiteList[SiteT]:
        """The candidate sites, from structure alone (`stat_requests` lists them before calibration)."""
        msg = f"pass '{self.name}' defines neither sites/rewrite nor plan"
        raise NotImplementedError(msg)

    def label(self, site: SiteT) -> str:
        """How the report names a site."""
        return site.label  # type: ignore[attr-defined]

    def check(self, site: SiteT, view: GraphView, stats: Stats, ctx: PassContext) -> str | None:
        """Why this site is skipped, or None to rewrite it."""
        return None

    def rewrite(self, site: SiteT, view: GraphView, stats: Stats, ctx: PassContext) -> Rewrite | str:
        """The site's edits, or the reason the computed rewrite is left out (it would change nothing)."""
        msg = f"pass '{self.name}' defines no rewrite"
        raise NotImplementedError(msg)

    def stat_kinds(self, ctx: PassContext) -> frozenset[StatKind]:
        """The statistics every site's activation needs (none by default)."""
        return frozenset()

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        """The calibration statistics `plan` needs: `stat_kinds` of every site's `value`."""
        kinds = self.stat_kinds(ctx)
        if not kinds:
            return []
        return [StatRequest(site.value, kinds) for site in self.sites(view, ctx).found]  # type: ignore[attr-defined]

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        """Decide the edits; must not modify the graph. Sites, then check and rewrite each."""
        listed = self.sites(view, ctx)
        plan = EditPlan(self.name, notes=skipped_notes(listed))
        self.plan_sites(plan, listed.found, view, stats, ctx)
        return plan

    def plan_sites(
        self, plan: EditPlan, sites: Sequence[SiteT], view: GraphView, stats: Stats, ctx: PassContext
    ) -> None:
        """Run check -> rewrite on every site in order, adding its edits and its note to `plan`."""
        for site in sites:
            label = self.label(site)
            result = self.check(site, view, stats, ctx)
            if result is None:
                result = self.rewrite(site, view, stats, ctx)
            if isinstance(result, str):
                plan.notes.append(SiteNote(label, False, result))
                continue
            plan.edits += result.edits
            plan.notes.append(SiteNote(label, True, result.detail))


def skipped_notes(listed: SiteList[Any]) -> list[SiteNote]:
    """The notes of the places rejected while matching."""
    return [SiteNote(label, False, reason) for label, reason in listed.skipped]


# ------------------------------------------------------------------ option vocabularies
# The enumerated options of the built-in passes' configs (`passes/` modules hold only the
# passes, their configs and sites; the recipe loader reads these through the configs' fields).
class RotationKind(enum.Enum):
    """Which orthogonal matrix."""

    HADAMARD = "hadamard"  # randomized Hadamard H diag(s) applied as x diag(s) H (QuaRot)
    RANDOM = "random"
    KLT = "klt"  # eigenvectors of the calibrated channel covariance, times a Hadamard (MambaQuant)
    DUQUANT = "duquant"  # greedy block rotations, zigzag permutation, block rotations (DuQuant)


class RotationLayout(enum.Enum):
    """Where rotations go."""

    SITES = "sites"  # one rotation per linear input (offline into a producer linear, or online)
    RESIDUAL = "residual"  # QuaRot: one Q through the whole residual stream, then the other sites


class ReorderMethod(enum.Enum):
    """How the permutation is chosen from a per-channel magnitude."""

    SORT = "sort"  # channels by descending magnitude: blocks hold channels of similar size
    BALANCE = "balance"  # only outlier channels move, packed into the fewest blocks (fewest moves)


class ReorderKey(enum.Enum):
    """The per-channel magnitude that orders channels."""

    ACTIVATION = "activation"  # calibrated absmax of the activation (needs calibration)
    RMS = "rms"  # calibrated root-mean-square: the typical size, not one extreme token
    WEIGHT = "weight"  # absmax of the consumers' input columns (no calibration)
