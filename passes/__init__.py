"""Rewrite passes, one module per family. `PASSES` maps recipe names to (config, pass) classes."""

from __future__ import annotations

from passes.base import PassContext, QPass
from passes.norm_fusion import FuseNorms, FuseNormsConfig
from passes.reorder import Reorder, ReorderConfig
from passes.rotate import Rotate, RotateConfig
from passes.smooth import SmoothQuant, SmoothQuantConfig
from passes.split import SplitQuant, SplitQuantConfig

PASSES: dict[str, tuple[type, type[QPass]]] = {
    "smooth_quant": (SmoothQuantConfig, SmoothQuant),
    "rotate": (RotateConfig, Rotate),
    "fuse_norms": (FuseNormsConfig, FuseNorms),
    "reorder": (ReorderConfig, Reorder),
    "split_quant": (SplitQuantConfig, SplitQuant),
}

__all__ = [
    "PASSES",
    "FuseNorms",
    "FuseNormsConfig",
    "PassContext",
    "QPass",
    "Reorder",
    "ReorderConfig",
    "Rotate",
    "RotateConfig",
    "SmoothQuant",
    "SmoothQuantConfig",
    "SplitQuant",
    "SplitQuantConfig",
]
