"""Running a recipe on a graph view up to its quantize plan: the passes (verified), the
calibration the quantize stage asks for, and the plan itself. What the plan is lowered to is the
caller's choice: the graph's own lowering (`qpass.api`), or the modules of a user's model
(`qpass.causal_lm`).
"""

from __future__ import annotations

from qpass.calibration import calibrate
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext
from qpass.pass_manager import PassReport, PassResult, run_passes
from qpass.pipeline import sequential_plan
from qpass.quant.qlinear import QuantPlan, plan_quantization, quant_stat_requests
from qpass.recipe import Recipe
from qpass.registry import build_pass, pass_config


def plan_recipe(
    view: GraphView,
    recipe: Recipe,
    batches: list,
    *,
    verify: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
) -> tuple[PassReport, QuantPlan | None]:
    """Run the recipe's passes on `view` (verified) and plan its quantization (None: the recipe
    quantizes nothing); lowering the plan is the caller's choice of target.
    """
    ctx = PassContext(recipe.weights, recipe.activations, progress)
    report = run_passes(view, _weight_passes(recipe), batches, ctx, verify=verify, tolerance=tolerance)
    if not recipe.quantizes:
        return report, None
    if recipe.calibration.sequential:  # block by block, each on its quantized predecessors' outputs
        plan, blocks = sequential_plan(
            view,
            recipe.weights,
            recipe.activations,
            batches,
            recipe.layers,
            recipe.calibration,
            progress=progress,
        )
        report.results.append(PassResult("sequential calibration", blocks))
    else:
        requests = quant_stat_requests(view, recipe.activations, recipe.weights)
        stats = calibrate(view, batches, requests, progress=progress, desc="quantize") if requests else None
        plan = plan_quantization(view, stats, recipe.weights, recipe.activations, batches, recipe.layers)
    report.results.append(PassResult("quantize", plan))
    return report, plan


def _weight_passes(recipe: Recipe) -> list:
    """The recipe's passes; `weights.algo: awq` appends the AWQ scale search unless a step already runs it."""
    steps = [s.build() for s in recipe.passes]
    if (
        recipe.weights is not None
        and recipe.weights.algo == "awq"
        and not any(p.name == "awq" for p in steps)
    ):
        steps.append(build_pass("awq", pass_config("awq")()))
    return steps
