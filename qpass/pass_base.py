"""The pass contract: a pass asks for statistics, then returns an `EditPlan` (plain data)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

from qpass.calibration import StatRequest, Stats
from qpass.graph.edits import EditPlan
from qpass.graph.view import GraphView
from qpass.qconfig import ActivationQuantConfig, WeightQuantConfig


@dataclass(frozen=True)
class PassContext:
    """What a pass may know beyond the graph: the recipe's target formats (for error-driven searches)."""

    weights: WeightQuantConfig | None = None
    activations: ActivationQuantConfig | None = None
    progress: bool = False


class QPass(abc.ABC):
    """A graph rewrite. `equivalent` passes must leave the FP function unchanged (verified)."""

    name: ClassVar[str]
    equivalent: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        """The calibration statistics `plan` needs (none by default)."""
        return []

    @abc.abstractmethod
    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        """Decide the edits; must not modify the graph."""
