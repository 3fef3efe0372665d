"""Rewrite passes, one module per family. `PASSES` maps recipe names to (config, pass) classes."""

from __future__ import annotations

from passes.awq import AWQ, AWQConfig
from passes.base import PassContext, QPass
from passes.decompose import Int8Decompose, Int8DecomposeConfig
from passes.disassemble import Disassemble, DisassembleConfig
from passes.norm_fusion import FuseNorms, FuseNormsConfig
from passes.reorder import Reorder, ReorderConfig
from passes.rotate import Rotate, RotateConfig
from passes.shift import OSPlusConfig, OutlierSuppressionPlus, OutlierTune, OutlierTuneConfig
from passes.smooth import SmoothQuant, SmoothQuantConfig
from passes.split import SplitQuant, SplitQuantConfig

PASSES: dict[str, tuple[type, type[QPass]]] = {
    "smooth_quant": (SmoothQuantConfig, SmoothQuant),
    "rotate": (RotateConfig, Rotate),
    "fuse_norms": (FuseNormsConfig, FuseNorms),
    "os_plus": (OSPlusConfig, OutlierSuppressionPlus),
    "outlier_tune": (OutlierTuneConfig, OutlierTune),
    "awq": (AWQConfig, AWQ),
    "reorder": (ReorderConfig, Reorder),
    "split_quant": (SplitQuantConfig, SplitQuant),
    "int8_decompose": (Int8DecomposeConfig, Int8Decompose),
    "disassemble": (DisassembleConfig, Disassemble),
}

__all__ = [
    "AWQ",
    "PASSES",
    "AWQConfig",
    "Disassemble",
    "DisassembleConfig",
    "FuseNorms",
    "FuseNormsConfig",
    "Int8Decompose",
    "Int8DecomposeConfig",
    "OSPlusConfig",
    "OutlierSuppressionPlus",
    "OutlierTune",
    "OutlierTuneConfig",
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
