"""After lowering: rotations to function ops, dead code out, constants folded, model checked.

Runs once on the whole lowered model (the per-linear lowering leaves the graph valid but with
unused initializers and opsets). onnxscript's optimizer folds constants with function inlining
off (the `qpass` function ops must stay ops) and with its default input-size limit, so the int4
and int8 weight initializers are never folded back into float. The result must pass
`onnx.checker.check_model(full_check=True)` (strict shape inference). Models over the 2 GB
protobuf limit cannot be checked in memory and skip it; `qpass.io.save_onnx` writes them with
external data.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from qpass.errors import PassError
from qpass.lowering.onnx_functions import lower_rotations
from qpass.qconfig import OnnxLoweringConfig

PROTO_LIMIT = 2**31 - 2**24  # bytes: leave headroom under protobuf's 2 GB for the graph itself


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def finalize_onnx(model: ir.Model, config: OnnxLoweringConfig | None = None) -> ir.Model:
    """Lower Hadamard rotations, optimize (if `config.optimize`) and check; edits `model` in place."""
    config = config or OnnxLoweringConfig()
    lower_rotations(model, config.rotation_op, _opset(model))
    if config.optimize:
        onnxscript.optimizer.optimize(model, inline=False, onnx_shape_inference=False)
    for p in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
        p(model)
    check_lowered(model)
    return model


def check_lowered(model: ir.Model) -> None:
    """onnx.checker with full check (strict shape inference); PassError naming the failure."""
    from qpass.io import EXTERNAL_KEY

    if initializer_bytes(model) > PROTO_LIMIT or model.meta.get(EXTERNAL_KEY):
        return  # too large for one protobuf in memory / weights still in the source's data files
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"lowered model '{model.graph.name}' fails onnx.checker (full_check): {first}"
        raise PassError(msg) from exc
