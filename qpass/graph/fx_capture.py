"""Getting a torch model into FX: torch.export capture, batch normalising, independent copies.

Everything that turns a user's `nn.Module` (or `ExportedProgram`) and its example batches into
the unlifted GraphModule that `FxGraphView` edits, kept apart from the adapter itself.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from qpass.errors import ModelLoadError

Batch = Any  # a tuple of positional args, a dict of keyword args, or one tensor


def split_batch(batch: Batch) -> tuple[tuple, dict]:
    """Normalise a torch calibration batch to (args, kwargs)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def all_dims_auto(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Dynamic-shape spec leaving every tensor dim to torch.export (Dim.AUTO), keyed by argument name."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return dict.fromkeys(range(x.dim()), torch.export.Dim.AUTO)
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def capture(model: torch.nn.Module | torch.export.ExportedProgram, example: Batch = None) -> fx.GraphModule:
    """torch.export a module (dims left dynamic where the model allows) and return its unlifted GraphModule."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, fx.GraphModule) and _is_captured(model):
        return model
    if example is None:
        msg = "capturing an nn.Module needs example inputs (pass example_inputs= or calibration batches)"
        raise ModelLoadError(msg)
    args, kwargs = split_batch(example)
    model.eval()
    try:
        # dims the model leaves free stay dynamic, so other batch/sequence sizes run too
        ep = torch.export.export(
            model, args, kwargs, dynamic_shapes=all_dims_auto(model, args, kwargs), strict=False
        )
    except Exception:  # noqa: BLE001 - some models only export with static shapes
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # torch.export raises many types; name the model and the cause
            first = str(exc).splitlines()[0] if str(exc) else ""
            msg = f"torch.export failed for {type(model).__name__}: {type(exc).__name__}: {first}"
            raise ModelLoadError(msg) from exc
    gm = ep.module()
    gm.meta["qpass_captured"] = True
    return gm


def _is_captured(gm: fx.GraphModule) -> bool:
    return bool(gm.meta.get("qpass_captured"))


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy, so the caller's model is never modified."""
    new = copy.deepcopy(gm)
    new.meta.update(gm.meta)
    return new
