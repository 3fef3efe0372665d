"""Quantize a transformers causal LM and hand back the user's kind of model: one that still
`generate()`s with its own KV cache.

The recipe runs where every recipe runs: on the torch.export graph of the model's logits (the
cache switched off for the capture only, never in the user's config), with verified passes and the
quantize stage's plan. The result is then mapped back onto the model's own modules instead of
being lowered into the graph:
- folded transforms (smoothing, rotations, norm fusion, reordering) changed the graph's constants,
  which torch.export names by the parameters they came from: each is written into its parameter;
- each quantized linear's `nn.Linear` is swapped for the lowering's quantized module (packed
  weights, the qpass kernels);
- an online Hadamard the recipe inserted belongs to the linear it feeds (fused into a per-token
  W8A8 quantizer, or a `PreRotated` wrapper).
Anything else a pass added or removed in the graph has no module to live in: the recipe is
refused with the reason, never a model that computes something else. The mapping is checked: the
model with its folded parameters must reproduce the transformed graph's logits.

Nothing here names an architecture: sites come from graph structure, modules from the
parameters' names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qpass.data import Batches
from qpass.errors import ConfigError
from qpass.graph.edits import EditPlan, SiteNote
from qpass.graph.fx import FxGraphView
from qpass.graph.fx_capture import capture
from qpass.lm_checkpoint import attach_saving
from qpass.lm_graph import PREFIX, Signature, attr, graph_signature, is_linear
from qpass.lm_inputs import token_rows
from qpass.lm_kv_cache import attach_kv_cache
from qpass.lm_rotations import online_rotations, place_rotations
from qpass.pass_manager import PassReport, PassResult, max_relative_error
from qpass.plan import plan_recipe
from qpass.quant.qlinear import QuantPlan
from qpass.recipe import Recipe, get_recipe
from qpass.registry import PreRotated, Rotation, quant_module, with_rotation

_PREFIX = "lm."  # the wrapper's attribute: graph constants are named "lm.<parameter name>"


def is_causal_lm(model: Any) -> bool:
    """A transformers model that generates text and is not an encoder-decoder."""
    if not isinstance(model, nn.Module) or not hasattr(model, "generate") or not hasattr(model, "config"):
        return False
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    config = model.config
    return (
        isinstance(model, PreTrainedModel)
        and isinstance(model, GenerationMixin)
        and not getattr(config, "is_encoder_decoder", False)
    )


class _Logits(nn.Module):
    """model(input_ids) -> logits with the cache off: the function the recipe transforms.

    Prefill logits are what every cached decode step recomputes piecewise, so a transform exact
    on them is exact through the cache.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits


@dataclass
class CausalLMResult:
    """The quantized transformers model (generates as before) and what happened to it."""

    model: nn.Module
    report: PassReport
    recipe: Recipe


def quantize_causal_lm(
    model: nn.Module,
    recipe: str | Path | Recipe | Mapping[str, Any],
    calibration: Any,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    max_rows: int = 128,
    inplace: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
    attach: bool = False,
) -> CausalLMResult:
    """Quantize `model` (a copy unless `inplace`) with `recipe`; the result still generates.

    `attach`: leave the linears float and attach each one's planned quantized form to its weight
    parameter instead (`qpass.calibrate`, for `torch.compile(backend="qpass")` to lower in the
    graphs dynamo captures); the folded transforms are written into the parameters either way.
    """
    recipe = get_recipe(recipe)
    rows = token_rows(calibration, tokenizer, seq_len, max_rows, _rows_per_batch(model, seq_len))
    # verification compares full-vocabulary logits before and after each pass: two rows show a
    # broken transform as surely as eight, at a quarter of the memory (Qwen2.5: 155 MB a row)
    batches = Batches([(ids,) for ids in rows], checks=[(rows[0][:2],)])
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    # the exported module shares the target's parameter storage: the passes' in-place edits land in
    # the (private, unless inplace) model directly, with no third copy of the weights
    gm = capture(_Logits(target), batches[0])
    before = graph_signature(gm)
    view = FxGraphView(gm)
    report, plan = plan_recipe(view, recipe, batches, verify=verify, tolerance=tolerance, progress=progress)
    placements = online_rotations(view.gm, before, recipe.name)
    notes = _write_back_constants(view.gm, target, before)
    params = dict(target.named_parameters(remove_duplicate=False))  # by the names the graph uses
    place_rotations(target, placements)
    err = _check_mapping(view.gm, target, batches.checks[0], tolerance) if verify else None
    report.results.append(PassResult("map to modules", EditPlan("map to modules", notes=notes), err))
    if plan is not None:
        if attach:
            _attach_plan(view, plan, target, params, recipe.name)
        else:
            _swap_linears(view, plan, target, params)
    target.qpass_recipe = recipe.to_dict()
    attach_saving(target)
    if recipe.kv_cache is not None:
        attach_kv_cache(target, recipe.kv_cache)
    return CausalLMResult(target, report, recipe)


_LOGITS_BUDGET = 512 << 20  # bytes of float32 logits one calibration forward may produce


def _rows_per_batch(model: nn.Module, seq_len: int) -> int:
    """Calibration rows per forward, so one batch's logits stay under `_LOGITS_BUDGET` (8 at most).

    The captured graph returns full-vocabulary logits for every position: 8 rows of 256 tokens
    are 1.2 GB on a 152k vocabulary, beside the weights.
    """
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    per_row = 4 * max(vocab, 1) * seq_len
    return max(1, min(8, _LOGITS_BUDGET // per_row))


def _write_back_constants(gm: fx.GraphModule, target: nn.Module, before: Signature) -> list[SiteNote]:
    """Copy every folded constant into the parameter or buffer it was captured from; returns notes.

    torch.export names a tied tensor once per module path (`lm_head.weight`, `embed_tokens.weight`),
    and the passes treat those as separate constants. Where they end up different (a rotation folded
    into the head but not the embedding), the later names get their own parameter: the model is
    untied, and the note says so.
    """
    notes: list[SiteNote] = []
    written: dict[int, str] = {}
    for name, shape in before.constants.items():
        if not name.startswith(PREFIX):
            continue
        new, path = attr(gm, name), name[len(PREFIX) :]
        old = attr(target, path)
        if tuple(new.shape) != shape:
            msg = f"constant '{path}' changed shape {shape} -> {tuple(new.shape)}; its module cannot take it"
            raise ConfigError(msg)
        first = written.get(id(old))
        if first is not None and not torch.equal(old, new):
            owner, _, leaf = path.rpartition(".")
            module = target.get_submodule(owner) if owner else target
            setattr(module, leaf, nn.Parameter(new.detach().clone(), requires_grad=False))
            if getattr(target.config, "tie_word_embeddings", False):
                target.config.tie_word_embeddings = False
            notes.append(SiteNote(path, True, f"untied from '{first}': the passes changed them differently"))
            continue
        written.setdefault(id(old), path)
        if not torch.equal(old, new):
            with torch.no_grad():
                old.copy_(new)
    return notes


def _check_mapping(gm: fx.GraphModule, target: nn.Module, batch: tuple, tolerance: float) -> float:
    """The model with its written-back parameters must compute the transformed graph's logits."""
    with torch.no_grad():
        graph_out = gm(*batch)
        model_out = _Logits(target)(*batch)
    err = max_relative_error([graph_out], [model_out])
    if err > tolerance:
        msg = (
            f"the passes' constants, written back into the model, give logits {err:.2e} off "
            f"the graph's (> {tolerance:g})"
        )
        raise ConfigError(msg)
    return err


def _swap_linears(
    view: FxGraphView, plan: QuantPlan, target: nn.Module, params: dict[str, nn.Parameter]
) -> None:
    """Replace the `nn.Linear` behind each quantized linear node by its quantized module; a
    rotation wrapped around it moves into the module's quantizer where the kernel takes it.
    """
    owners = _linear_owners(target)
    for edit in plan.edits:
        node = view.node(edit.op)
        weight = node.args[1] if is_linear(node) else None
        if weight is None or weight.op != "get_attr" or not str(weight.target).startswith(PREFIX):
            msg = (
                f"linear '{edit.op.name}' does not read a model parameter as its weight; it cannot be swapped"
            )
            raise ConfigError(msg)
        param = params.get(str(weight.target)[len(PREFIX) :])
        paths = owners.get(id(param), [])
        if len(paths) != 1:
            msg = (
                f"linear '{edit.op.name}': weight '{weight.target}' belongs to {len(paths)} "
                "nn.Linear modules (expected 1)"
            )
            raise ConfigError(msg)
        parent_path, _, child = paths[0].rpartition(".")
        parent = target.get_submodule(parent_path) if parent_path else target
        linear: nn.Linear = getattr(parent, child)
        module = quant_module(
            edit.qlinear, linear.weight.detach().clone(), _graph_bias(view.gm, node), edit.op.name
        )
        module.qpass_qlinear = edit.qlinear  # what a checkpoint stores (qpass.lm_checkpoint)
        if isinstance(parent, PreRotated) and child == "inner":  # the wrapper's rotation, fused if it can be
            grand_path, _, parent_name = parent_path.rpartition(".")
            grand = target.get_submodule(grand_path) if grand_path else target
            setattr(grand, parent_name, with_rotation(Rotation(parent.signs, parent.matrix), module))
        else:
            setattr(parent, child, module)


def _attach_plan(
    view: FxGraphView, plan: QuantPlan, target: nn.Module, params: dict[str, nn.Parameter], recipe: str
) -> None:
    """Attach each quantized linear's QLinear to the weight parameter it reads (`qpass_qlinear`),
    with the recipe's name; the compile backend lowers the graphs it is handed from these.
    """
    for edit in plan.edits:
        node = view.node(edit.op)
        weight = node.args[1] if is_linear(node) else None
        param = (
            params.get(str(weight.target)[len(PREFIX) :])
            if weight is not None and weight.op == "get_attr" and str(weight.target).startswith(PREFIX)
            else None
        )
        if param is None:
            msg = f"linear '{edit.op.name}' does not read a model parameter as its weight; nothing to attach to"
            raise ConfigError(msg)
        bias = _graph_bias(view.gm, node)
        owner = _linear_owners(target).get(id(param), [])
        module_bias = target.get_submodule(owner[0]).bias if len(owner) == 1 else None
        if bias is not None and module_bias is None:
            msg = (
                f"linear '{edit.op.name}': the recipe gave it a bias its module lacks; "
                "qpass.calibrate cannot attach it (qpass.quantize swaps the module instead)"
            )
            raise ConfigError(msg)
        param.qpass_qlinear = edit.qlinear
        param.qpass_recipe = recipe


def _graph_bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The bias the transformed graph's linear adds (a pass may have created one the module lacks)."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is None:
        return None
    if not isinstance(bias, fx.Node) or bias.op != "get_attr":
        msg = f"linear '{node.name}': its bias is computed, not a constant; it cannot be swapped"
        raise ConfigError(msg)
    return attr(gm, str(bias.target)).detach().clone()


def _linear_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> the paths of the nn.Linear modules holding it (tied weights: several names)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            owners.setdefault(id(module.weight), []).append(path)
    return owners
