"""`torch.compile(model, backend="qpass", options={"recipe": ...})`: quantize what dynamo captured,
lower it, and hand the result to Inductor.

This is the app side of the backend: it parses `options=`, looks the recipe up, decides whether the
recipe can run without calibration data, and runs `qpass.api.quantize_with_report` (the one
pipeline: capture, verified passes, quantization, lowering to `QuantLinear` modules) on the graph
dynamo captured. The torch mechanics (freezing the lifted parameters, compiling with Inductor) live
in `qpass.lowering.compile_backend` and are reached through `qpass.registry`.

Calibration-free recipes (weight-only RTN, rotations, dynamic per-token activations) need nothing
more; recipes that need statistics (static activation ranges, GPTQ, smoothing) take batches through
`options={"calibration": batches}`. Without a recipe, the graph is compiled as it is: the way to
compile a model `qpass.quantize` already quantized (its QuantLinear modules trace into the qpass
kernel ops).

Registered for `backend="qpass"` through the `torch_dynamo_backends` entry point in
pyproject.toml; `register()` does the same by hand where the package is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.fx as fx

from qpass.errors import ConfigError
from qpass.recipe import Recipe, get_recipe

BACKEND_NAME = "qpass"


@dataclass(frozen=True)
class BackendOptions:
    """The `options=` of `torch.compile(..., backend="qpass")`."""

    recipe: Recipe | None = None  # a Recipe, built-in name, file path or mapping; None: compile as is
    calibration: Any = None  # batches for recipes that need statistics
    inductor: bool = True  # False: run the quantized graph eagerly
    verify: bool = False  # check each equivalent pass numerically on the example inputs

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            msg = f"torch.compile(backend='qpass') option '{unknown[0]}' is unknown; expected one of {known}"
            raise ConfigError(msg)
        if options.get("recipe") is not None:
            options["recipe"] = get_recipe(options["recipe"])
        return cls(**options)


def calibration_needs(recipe: Recipe, view: Any) -> list[str]:
    """What in `recipe` needs calibration statistics on this graph (empty: calibration-free)."""
    from qpass.pass_base import PassContext

    ctx = PassContext(recipe.weights, recipe.activations)
    needs = [s.name for s in recipe.passes if s.build().stat_requests(view, ctx)]
    if recipe.activations is not None and not recipe.activations.dynamic:
        needs.append("activations (static ranges)")
    if recipe.weights is not None and recipe.weights.algo == "gptq":
        needs.append("weights (gptq)")
    return needs


def quantize_graph(gm: fx.GraphModule, inputs: Sequence[Any], opts: BackendOptions) -> fx.GraphModule:
    """Run the recipe through qpass's one pipeline on a frozen dynamo graph.

    Inside a dynamo compile the graph is retraced to ATen in dynamo's fake mode (SymInt inputs and
    a cache's symbolic lengths included; `qpass.registry.trace_aten`); the recipe then runs on
    concrete values (each SymInt at its hint). Called by hand, outside dynamo, the graph is captured
    with torch.export as any module is.
    """
    from qpass.api import quantize_with_report
    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture
    from qpass.registry import concrete_inputs, trace_aten

    example = concrete_inputs(inputs)
    captured = trace_aten(gm)
    if captured is None:
        captured = capture(gm, example)
    recipe = opts.recipe
    calibration = opts.calibration
    if calibration is None:
        needs = calibration_needs(recipe, FxGraphView(captured))
        if needs:
            msg = (
                f"recipe '{recipe.name}' needs calibration statistics for {', '.join(needs)}: pass "
                "options={'recipe': ..., 'calibration': batches}, attach statistics first with "
                "qpass.calibrate(model, recipe, data), or quantize with qpass.quantize"
            )
            raise ConfigError(msg)
        calibration = [example]
    with torch._guards.tracing(None), torch.no_grad():  # concrete runs: no fake mode, no dynamo guards
        result = quantize_with_report(captured, recipe, calibration, verify=opts.verify)
    return result.model


def attached_forms(inputs: Sequence[Any]) -> dict[int, Any]:
    """data_ptr -> QLinear for the weight parameters `qpass.calibrate` annotated (`qpass_qlinear`)."""
    return {
        v.data_ptr(): v for v in inputs if isinstance(v, torch.Tensor) and hasattr(v, "qpass_qlinear")
    }


def lower_attached(gm: fx.GraphModule, inputs: Sequence[Any], params: dict[int, Any], opts: BackendOptions):
    """Lower a frozen dynamo graph from the quantized forms `qpass.calibrate` attached to its weights.

    The passes already ran (their folded transforms are in the parameters, online rotations in
    the modules, so dynamo traced them); what is left is to swap each linear that reads an
    annotated weight for its quantized module. A form planned for another recipe is refused.
    """
    from dataclasses import replace

    from qpass.graph.fx import FxGraphView
    from qpass.graph.fx_capture import capture
    from qpass.graph.refs import OpKind
    from qpass.quant.qlinear import QuantPlan, ReplaceWithQOp
    from qpass.registry import concrete_inputs, lower, trace_aten

    names = {getattr(p, "qpass_recipe", None) for p in params.values()}
    if names != {opts.recipe.name}:
        msg = (
            f"torch.compile(backend='qpass'): options recipe '{opts.recipe.name}' but the model was "
            f"calibrated with qpass.calibrate for {sorted(str(n) for n in names)}"
        )
        raise ConfigError(msg)
    captured = trace_aten(gm)
    view = FxGraphView(captured if captured is not None else capture(gm, concrete_inputs(inputs)))
    plan = QuantPlan("quantize (attached)")
    for op in view.ops_of(OpKind.LINEAR):
        ref = view.weight(op)
        param = params.get(_constant(view.gm, ref.const.name).data_ptr()) if ref is not None else None
        if param is None:
            continue  # not planned (excluded by the recipe, or not a model weight): stays float
        q = param.qpass_qlinear
        if q.weight.const.shape != ref.const.shape:
            msg = f"linear '{op.name}': weight {ref.const.shape} but its attached form is for {q.weight.const.shape}"
            raise ConfigError(msg)
        plan.edits.append(ReplaceWithQOp(op, replace(q, weight=replace(q.weight, const=ref.const, bias=ref.bias))))
    lower(view, plan, opts.recipe.lowering)
    return view.gm


def _constant(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """The graph's own constant tensor (`view.read` returns a copy; its storage names the parameter)."""
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def qpass_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """The dynamo backend: quantize with `options["recipe"]` (if any), lower, compile."""
    from qpass.registry import compile_graph, freeze_parameters

    opts = BackendOptions.parse(options)
    if opts.recipe is None:
        return compile_graph(gm, example_inputs, opts.inductor)
    attached = attached_forms(example_inputs)
    gm, keep = freeze_parameters(gm, example_inputs)
    user_inputs = [example_inputs[i] for i in keep]
    qgm = lower_attached(gm, user_inputs, attached, opts) if attached else quantize_graph(gm, user_inputs, opts)
    compiled = compile_graph(qgm, user_inputs, opts.inductor)

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    return run


def register() -> None:
    """Register `backend="qpass"` with dynamo (what the entry point does once the package is installed)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS:
        register_backend(qpass_backend, name=BACKEND_NAME)
