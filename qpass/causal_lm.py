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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qpass.errors import CalibrationError, ConfigError
from qpass.graph.edits import EditPlan, SiteNote
from qpass.graph.fx import FxGraphView
from qpass.graph.fx_capture import capture, clone_graph_module
from qpass.pass_manager import PassReport, PassResult, max_relative_error
from qpass.plan import plan_recipe
from qpass.quant.qlinear import QuantPlan
from qpass.recipe import Recipe, get_recipe
from qpass.registry import PostRotated, PreRotated, Rotation, quant_module, with_rotation

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


def token_rows(calibration: Any, tokenizer: Any = None, seq_len: int = 256) -> list[torch.Tensor]:
    """Calibration as int64 `input_ids` batches [B, T] with no padding.

    Accepts input_ids tensors, dicts holding `input_ids` (an `attention_mask` must be all ones:
    padded rows wreck static ranges), or text (a string or strings) with `tokenizer`, packed
    end to end into full rows of `seq_len` tokens.
    """
    if isinstance(calibration, (str, Path)) or (
        isinstance(calibration, Sequence) and calibration and all(isinstance(c, str) for c in calibration)
    ):
        texts = [str(calibration)] if isinstance(calibration, (str, Path)) else list(calibration)
        return [_pack(tokenizer, texts, seq_len)]
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or not calibration:
        msg = "calibration: expected input_ids tensors, dicts with 'input_ids', or text with tokenizer="
        raise CalibrationError(msg)
    rows = []
    for i, item in enumerate(calibration):
        if isinstance(item, (tuple, list)) and len(item) == 1:
            item = item[0]
        if isinstance(item, Mapping):
            mask = item.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).all()):
                msg = (
                    f"calibration batch {i}: 'attention_mask' has padding; pack text into full rows "
                    "(pass text with tokenizer=) so padded positions do not enter the ranges"
                )
                raise CalibrationError(msg)
            if "input_ids" not in item:
                msg = f"calibration batch {i}: no 'input_ids' key (keys: {sorted(item)})"
                raise CalibrationError(msg)
            item = item["input_ids"]
        ids = torch.as_tensor(item)
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
            msg = f"calibration batch {i}: expected integer input_ids [B, T], got {ids.dtype} {tuple(ids.shape)}"
            raise CalibrationError(msg)
        rows.append(ids.reshape(1, -1).long() if ids.dim() == 1 else ids.long())
    return rows


def _pack(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    if tokenizer is None:
        msg = "calibration: text needs the model's tokenizer (tokenizer=...)"
        raise CalibrationError(msg)
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    for t in texts:
        ids += list(tokenizer(t, add_special_tokens=False)["input_ids"]) + sep
    n = len(ids) // seq_len
    if n == 0:
        msg = f"calibration: the text holds {len(ids)} tokens, fewer than one row of {seq_len}"
        raise CalibrationError(msg)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def quantize_causal_lm(
    model: nn.Module,
    recipe: str | Path | Recipe | Mapping[str, Any],
    calibration: Any,
    *,
    tokenizer: Any = None,
    seq_len: int = 256,
    inplace: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
) -> CausalLMResult:
    """Quantize `model` (a copy unless `inplace`) with `recipe`; the result still generates."""
    recipe = get_recipe(recipe)
    batches = [(ids,) for ids in token_rows(calibration, tokenizer, seq_len)]
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    gm = clone_graph_module(capture(_Logits(target), batches[0]))
    before = _graph_signature(gm)
    view = FxGraphView(gm)
    report, plan = plan_recipe(view, recipe, batches, verify=verify, tolerance=tolerance, progress=progress)
    placements = _online_rotations(view.gm, before, recipe.name)
    notes = _write_back_constants(view.gm, target, before)
    params = dict(target.named_parameters(remove_duplicate=False))  # by the names the graph uses
    _place_rotations(target, placements)
    err = _check_mapping(view.gm, target, batches[0], tolerance) if verify else None
    report.results.append(PassResult("map to modules", EditPlan("map to modules", notes=notes), err))
    if plan is not None:
        _swap_linears(view, plan, target, params)
    target.qpass_recipe = recipe.to_dict()
    return CausalLMResult(target, report, recipe)


@dataclass(frozen=True)
class _Signature:
    calls: frozenset[str]  # names of the captured graph's compute nodes
    constants: dict[str, tuple[int, ...]]  # get_attr targets and their shapes


def _graph_signature(gm: fx.GraphModule) -> _Signature:
    calls = frozenset(
        n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
    )
    constants = {
        str(n.target): tuple(_attr(gm, str(n.target)).shape) for n in gm.graph.nodes if n.op == "get_attr"
    }
    return _Signature(calls, constants)


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


@dataclass(frozen=True)
class _Placement:
    """An online rotation the passes inserted, and the module it becomes part of."""

    module: str  # path in the user's model
    before: bool  # True: rotates the module's input; False: its output
    rotation: Rotation


def _online_rotations(gm: fx.GraphModule, before: _Signature, recipe: str) -> list[_Placement]:
    """Where each inserted online rotation lives in the module tree; any other new op refuses.

    A rotation whose readers all sit in one module rotates that module's input; one whose source
    is the last op of a module (its readers all outside it) rotates that module's output. The
    module is read from the nodes' `nn_module_stack`, so nothing here names an architecture.
    """
    hadamard = torch.ops.qpass.hadamard_transform.default
    found: list[_Placement] = []
    last = _last_nodes(gm)
    now = {n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
    gone = sorted(before.calls - now)
    if gone:
        msg = f"recipe '{recipe}': its passes removed op '{gone[0]}' from the graph; no module of the model can drop it"
        raise ConfigError(msg)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.name in before.calls:
            continue
        const = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], fx.Node) else None
        place = None
        if (
            node.target in (hadamard, torch.ops.aten.matmul.default)
            and const is not None
            and const.op == "get_attr"
        ):
            value = _attr(gm, str(const.target)).detach().clone()
            rotation = Rotation(signs=value) if node.target is hadamard else Rotation(matrix=value)
            place = _host(node, rotation, last)
        if place is None:
            msg = (
                f"recipe '{recipe}': pass-inserted op '{node.name}' ({node.target}) has no module to live in "
                "(only online rotations at a module's input or output map back onto a transformers model)"
            )
            raise ConfigError(msg)
        found.append(place)
    return found


def _module_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(_PREFIX) :] if path.startswith(_PREFIX) else None


def _inside(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(module + "."))


def _last_nodes(gm: fx.GraphModule) -> dict[str, str]:
    """Each module path -> the name of its last node in graph order (what the module returns)."""
    last: dict[str, str] = {}
    for n in gm.graph.nodes:
        path = _module_of(n)
        while path:
            last[path] = n.name
            path = path.rpartition(".")[0]
    return last


def _host(node: fx.Node, rotation: Rotation, last: dict[str, str]) -> _Placement | None:
    """The module an inserted rotation belongs to: the producer whose output it rotates (the
    rotation's source is that module's last node, all readers outside it), else the one module
    whose input it rotates (every reader inside it, nothing derived from it leaving the module
    except through the module's last node). None: no module holds it exactly.
    """
    src = node.args[0]
    producer = _module_of(src) if isinstance(src, fx.Node) else None
    if (
        producer
        and last.get(producer) == src.name
        and not any(_inside(_module_of(u), producer) for u in node.users)
    ):
        return _Placement(producer, False, rotation)
    readers = {_module_of(u) for u in node.users}
    if len(readers) != 1 or None in readers:
        return None
    (module,) = readers
    seen, todo = set(), list(node.users)
    while todo:
        u = todo.pop()
        if u.name in seen:
            continue
        seen.add(u.name)
        for v in u.users:
            if _inside(_module_of(v), module):
                todo.append(v)
            elif last.get(module) != u.name:
                return None  # a value computed from the rotated input escapes the module
    return _Placement(module, True, rotation)


def _place_rotations(target: nn.Module, placements: list[_Placement]) -> None:
    """Wrap each host module with its rotation (float modules; linears are swapped later)."""
    for place in placements:
        parent_path, _, child = place.module.rpartition(".")
        parent = target.get_submodule(parent_path) if parent_path else target
        module = getattr(parent, child)
        wrapped = PreRotated(place.rotation, module) if place.before else PostRotated(module, place.rotation)
        setattr(parent, child, wrapped)


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.linear.default


def _write_back_constants(gm: fx.GraphModule, target: nn.Module, before: _Signature) -> list[SiteNote]:
    """Copy every folded constant into the parameter or buffer it was captured from; returns notes.

    torch.export names a tied tensor once per module path (`lm_head.weight`, `embed_tokens.weight`),
    and the passes treat those as separate constants. Where they end up different (a rotation folded
    into the head but not the embedding), the later names get their own parameter: the model is
    untied, and the note says so.
    """
    notes: list[SiteNote] = []
    written: dict[int, str] = {}
    for name, shape in before.constants.items():
        if not name.startswith(_PREFIX):
            continue
        new, path = _attr(gm, name), name[len(_PREFIX) :]
        old = _attr(target, path)
        if tuple(new.shape) != shape:
            msg = f"constant '{path}' changed shape {shape} -> {tuple(new.shape)}; its module cannot take it"
            raise ConfigError(msg)
        first = written.get(id(old))
        if first is not None and not torch.equal(old, new):
            owner, _, attr = path.rpartition(".")
            module = target.get_submodule(owner) if owner else target
            setattr(module, attr, nn.Parameter(new.detach().clone(), requires_grad=False))
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
        weight = node.args[1] if _is_linear(node) else None
        if weight is None or weight.op != "get_attr" or not str(weight.target).startswith(_PREFIX):
            msg = (
                f"linear '{edit.op.name}' does not read a model parameter as its weight; it cannot be swapped"
            )
            raise ConfigError(msg)
        param = params.get(str(weight.target)[len(_PREFIX) :])
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
        if isinstance(parent, PreRotated) and child == "inner":  # the wrapper's rotation, fused if it can be
            grand_path, _, parent_name = parent_path.rpartition(".")
            grand = target.get_submodule(grand_path) if grand_path else target
            setattr(grand, parent_name, with_rotation(Rotation(parent.signs, parent.matrix), module))
        else:
            setattr(parent, child, module)


def _graph_bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The bias the transformed graph's linear adds (a pass may have created one the module lacks)."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is None:
        return None
    if not isinstance(bias, fx.Node) or bias.op != "get_attr":
        msg = f"linear '{node.name}': its bias is computed, not a constant; it cannot be swapped"
        raise ConfigError(msg)
    return _attr(gm, str(bias.target)).detach().clone()


def _linear_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> the paths of the nn.Linear modules holding it (tied weights: several names)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            owners.setdefault(id(module.weight), []).append(path)
    return owners
