"""Save and load a quantized torch model with the recipe that made it: one `.pt2` file holding the
lowered program, its packed weights and the recipe (JSON in the archive's extra files).

This is the app side: the recipe is qpass's app-level object, so writing and validating it lives
here; exporting and reading the program itself is lowering (`qpass.lowering.torch_save`, reached
through `qpass.registry`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from qpass.errors import ConfigError, ModelLoadError
from qpass.recipe import Recipe
from qpass.registry import export_program, read_program

_RECIPE_FILE = "qpass_recipe.json"


@dataclass
class LoadedModel:
    """A loaded quantized model: call `module` like the original; `recipe` made it."""

    module: torch.nn.Module
    recipe: Recipe | None


def save_quantized(model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any) -> None:
    """Export `model` (a `qpass.quantize` result) on `example_inputs` and write it with its recipe."""
    recipe = getattr(model, "meta", {}).get("qpass_recipe")
    extra = {_RECIPE_FILE: json.dumps(recipe)} if recipe is not None else {}
    export_program(model, path, example_inputs, extra)


def load_quantized(path: str | os.PathLike) -> LoadedModel:
    """Load what `save_quantized` wrote: the runnable module and the recipe."""
    extra = {_RECIPE_FILE: ""}
    module = read_program(path, extra)
    recipe = None
    if extra[_RECIPE_FILE]:
        try:
            recipe = Recipe.from_dict(
                json.loads(extra[_RECIPE_FILE]), origin=f"{os.fspath(path)}:{_RECIPE_FILE}"
            )
        except (json.JSONDecodeError, ConfigError) as exc:
            msg = f"{os.fspath(path)}: stored recipe is invalid: {exc}"
            raise ModelLoadError(msg) from exc
    return LoadedModel(module, recipe)
