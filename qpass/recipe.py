"""Recipes: the passes to run (in order) and the weight/activation formats, loadable from
YAML/TOML/JSON files or by built-in name (`qpass recipes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml

from qpass.config import from_mapping, to_mapping
from qpass.errors import ConfigError
from qpass.pass_base import PassContext, QPass
from qpass.pass_manager import check_pass_order
from qpass.qconfig import (
    ActivationQuantConfig,
    CalibrationConfig,
    KVCacheConfig,
    OnnxLoweringConfig,
    WeightQuantConfig,
)
from qpass.quant.selection import LayerSelection
from qpass.registry import PASSES

_TOP_KEYS = (
    "name",
    "description",
    "passes",
    "weights",
    "activations",
    "target",
    "lowering",
    "exclude",
    "only",
    "kv_cache",
    "calibration",
)


@dataclass(frozen=True)
class PassStep:
    """One entry of `passes:`: a registered pass name and its typed config."""

    name: str
    config: Any

    def build(self) -> QPass:
        return PASSES[self.name][1](self.config)


@dataclass(frozen=True)
class Recipe:
    """What to do to a model. `weights`/`activations` None means passes only (FP model out)."""

    name: str = "custom"
    description: str = ""
    passes: tuple[PassStep, ...] = field(default_factory=tuple)
    weights: WeightQuantConfig | None = None
    activations: ActivationQuantConfig | None = None
    target: Literal["onnxruntime", "torch"] = "onnxruntime"
    lowering: OnnxLoweringConfig = field(default_factory=OnnxLoweringConfig)
    layers: LayerSelection = field(default_factory=LayerSelection)  # recipe keys `exclude:` / `only:`
    kv_cache: KVCacheConfig | None = None  # transformers LMs: applied inside the cache (qpass.lm_kv_cache)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # qpass.pipeline

    def __post_init__(self) -> None:
        # what the passes declare (must run last, formats they need) is checked when the recipe is made
        check_pass_order([s.build() for s in self.passes], PassContext(self.weights, self.activations))

    @property
    def quantizes(self) -> bool:
        return self.weights is not None or self.activations is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            msg = f"{origin}: a recipe is a mapping with keys {', '.join(_TOP_KEYS)}"
            raise ConfigError(msg)
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            msg = f"{origin}: recipe key '{unknown[0]}' is unknown; expected one of: {', '.join(_TOP_KEYS)}"
            raise ConfigError(msg)
        steps = tuple(_parse_step(entry, i, origin) for i, entry in enumerate(data.get("passes") or []))
        weights = data.get("weights")
        acts = data.get("activations")
        target = data.get("target", "onnxruntime")
        if target not in ("onnxruntime", "torch"):
            msg = f"{origin}: recipe key 'target': expected 'onnxruntime' | 'torch', got {target!r}"
            raise ConfigError(msg)
        try:
            return cls(
                name=str(data.get("name", "custom")),
                description=str(data.get("description", "")),
                passes=steps,
                weights=None if weights is None else from_mapping(WeightQuantConfig, weights, "weights"),
                activations=None
                if acts is None
                else from_mapping(ActivationQuantConfig, acts, "activations"),
                target=target,
                lowering=from_mapping(OnnxLoweringConfig, data.get("lowering"), "lowering"),
                layers=LayerSelection.parse(data.get("exclude"), data.get("only"), origin),
                kv_cache=None
                if data.get("kv_cache") is None
                else from_mapping(KVCacheConfig, data["kv_cache"], "kv_cache"),
                calibration=from_mapping(CalibrationConfig, data.get("calibration"), "calibration"),
            )
        except ConfigError as exc:
            msg = f"{origin}: {exc}"
            raise ConfigError(msg) from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            msg = f"{path}: cannot read recipe ({exc.strerror})"
            raise ConfigError(msg) from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                data = tomllib.loads(text)
            else:
                data = yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            first = str(exc).splitlines()[0]
            msg = f"{path}: not valid {path.suffix.lstrip('.') or 'yaml'}: {first}"
            raise ConfigError(msg) from None
        return cls.from_dict(data or {}, origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [{s.name: to_mapping(s.config)} for s in self.passes],
            "weights": to_mapping(self.weights),
            "activations": to_mapping(self.activations),
            "target": self.target,
            "lowering": to_mapping(self.lowering),
            **({"exclude": list(self.layers.exclude)} if self.layers.exclude else {}),
            **({"only": list(self.layers.only)} if self.layers.only else {}),
            **({"kv_cache": to_mapping(self.kv_cache)} if self.kv_cache is not None else {}),
            **(
                {"calibration": to_mapping(self.calibration)}
                if self.calibration != CalibrationConfig()
                else {}
            ),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_step(entry: Any, index: int, origin: str) -> PassStep:
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, Mapping) or len(entry) != 1:
        msg = f"{origin}: recipe key 'passes[{index}]': expected {{pass_name: {{options}}}}, got {entry!r}"
        raise ConfigError(msg)
    ((name, params),) = entry.items()
    if name not in PASSES:
        msg = f"{origin}: recipe key 'passes[{index}]': unknown pass '{name}'; known: {', '.join(sorted(PASSES))}"
        raise ConfigError(msg)
    try:
        config = from_mapping(PASSES[name][0], params, name)
    except ConfigError as exc:
        msg = f"{origin}: {exc}"
        raise ConfigError(msg) from None
    return PassStep(name, config)


def builtin_names() -> list[str]:
    files = resources.files("qpass") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def builtin_text(name: str) -> str:
    path = resources.files("qpass") / "recipes" / f"{name}.yaml"
    if not path.is_file():
        msg = f"unknown recipe '{name}'; built-in recipes: {', '.join(builtin_names())} (or give a recipe file path)"
        raise ConfigError(msg)
    return path.read_text()


def get_recipe(spec: str | Path | Recipe | Mapping[str, Any]) -> Recipe:
    """A Recipe from a Recipe, a mapping, a built-in name, or a recipe file path."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return Recipe.from_dict(spec)
    text = str(spec)
    if Path(text).suffix in (".yaml", ".yml", ".json", ".toml") or Path(text).is_file():
        return Recipe.load(text)
    return Recipe.from_dict(yaml.safe_load(builtin_text(text)), origin=f"built-in recipe '{text}'")
