"""qpass: an outlier-aware quantization compiler for PyTorch (torch.fx) and ONNX graphs.

The public names load on first use, so `import qpass.<submodule>` (a CLI step, a kernel) does
not pay for torch.export, ONNX and transformers up front.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "QuantizeResult": "qpass.api",
    "quantize": "qpass.api",
    "quantize_file": "qpass.api",
    "quantize_with_report": "qpass.api",
    "Stats": "qpass.calibration",
    "calibrate": "qpass.api",
    "Feeds": "qpass.data",
    "QPassError": "qpass.errors",
    "Recipe": "qpass.recipe",
    "get_recipe": "qpass.recipe",
    "export": "qpass.export_ct",
    "load": "qpass.lm_checkpoint",
    "save": "qpass.lm_checkpoint",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        msg = f"module 'qpass' has no attribute '{name}'"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
