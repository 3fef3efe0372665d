"""The one place the core looks upward: recipe pass names to pass classes, and graph kinds to their
lowering. The app modules (`recipe`, `api`, `cli`, `backend`, `saved_model`, `sources`) reach passes
and lowerings (the dynamo backend's freeze/compile mechanics, the `.pt2` program writer and reader
included) only through here, so the core never imports `qpass.passes` or `qpass.lowering` and the
layering test can hold everything else to one direction.

Adding a pass: write `passes/<name>.py` (a `QPass` subclass and its config dataclass) and add one
line to `PASSES` below.
"""

from __future__ import annotations

from qpass.graph.fx import FxGraphView
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.view import GraphView
from qpass.lowering.compile_backend import compile_graph, concrete_inputs, freeze_parameters, trace_aten
from qpass.lowering.onnx_finalize import finalize_onnx
from qpass.lowering.onnxruntime import lower_onnx
from qpass.lowering.torch_lower import (
    PostRotated,
    PreRotated,
    Rotation,
    lower_fx,
    quant_module,
    with_rotation,
)
from qpass.lowering.torch_save import export_program, read_program, register_qpass_ops
from qpass.pass_base import QPass
from qpass.passes.awq import AWQ, AWQConfig
from qpass.passes.bias_correction import BiasCorrection, BiasCorrectionConfig
from qpass.passes.decompose import Int8Decompose, Int8DecomposeConfig
from qpass.passes.disassemble import Disassemble, DisassembleConfig
from qpass.passes.equalize import CrossLayerEqualization, EqualizeConfig
from qpass.passes.norm_fusion import FuseNorms, FuseNormsConfig
from qpass.passes.reorder import Reorder, ReorderConfig
from qpass.passes.rotate import Rotate, RotateConfig
from qpass.passes.shift import OSPlusConfig, OutlierSuppressionPlus, OutlierTune, OutlierTuneConfig
from qpass.passes.smooth import SmoothQuant, SmoothQuantConfig
from qpass.passes.split import SplitQuant, SplitQuantConfig
from qpass.qconfig import OnnxLoweringConfig
from qpass.quant.qlinear import QuantPlan

__all__ = [
    "PASSES",
    "PostRotated",
    "PreRotated",
    "Rotation",
    "build_pass",
    "compile_graph",
    "concrete_inputs",
    "export_program",
    "finalize_onnx",
    "freeze_parameters",
    "trace_aten",
    "lower",
    "pass_config",
    "quant_module",
    "read_program",
    "register_pass",
    "register_qpass_ops",
    "with_rotation",
]

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
    "equalize": (EqualizeConfig, CrossLayerEqualization),
    "bias_correction": (BiasCorrectionConfig, BiasCorrection),
}


def register_pass(name: str, config_cls: type, pass_cls: type[QPass]) -> None:
    """Make a pass defined outside qpass usable by name in recipes (e.g. `examples/write_a_pass.py`)."""
    PASSES[name] = (config_cls, pass_cls)


def pass_config(name: str) -> type:
    return PASSES[name][0]


def build_pass(name: str, config: object) -> QPass:
    return PASSES[name][1](config)


def lower(view: GraphView, plan: QuantPlan, onnx_config: OnnxLoweringConfig | None = None) -> None:
    """Lower the quantize stage's plan on the view's graph kind: QuantLinear modules calling the qpass
    kernels (FX), or ONNX Runtime ops (`onnx_config`: the recipe's `lowering` section).
    """
    if isinstance(view, FxGraphView):
        lower_fx(view, plan)
    elif isinstance(view, OnnxGraphView):
        lower_onnx(view, plan, onnx_config)
    else:
        msg = f"no lowering for {type(view).__name__} graphs"
        raise TypeError(msg)
