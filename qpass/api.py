"""The public entry point: `quantize(model, recipe, calibration=...)` for torch and ONNX models."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from qpass.causal_lm import is_causal_lm, quantize_causal_lm
from qpass.data import onnx_batches, torch_batches
from qpass.errors import ConfigError, PassError
from qpass.genai_feeds import GenAICalibration, calibration_feeds
from qpass.genai_folder import copy_folder_rest, is_genai_folder, load_genai_folder, updated_config
from qpass.graph.fx import FxGraphView
from qpass.graph.fx_capture import capture, clone_graph_module
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.onnx_load import load_model
from qpass.graph.view import GraphView
from qpass.io import atomic_folder, check_output_path, save_onnx
from qpass.pass_manager import PassReport
from qpass.plan import plan_recipe
from qpass.recipe import Recipe, get_recipe
from qpass.registry import finalize_onnx, lower

ModelLike = torch.nn.Module | torch.export.ExportedProgram | onnx.ModelProto | ir.Model | str | os.PathLike


@dataclass
class QuantizeResult:
    """The transformed model (GraphModule for torch inputs, ModelProto for ONNX) and what happened."""

    model: Any
    report: PassReport
    recipe: Recipe


def _is_onnx(model: Any) -> bool:
    return isinstance(model, (onnx.ModelProto, ir.Model, str, os.PathLike))


def open_view(model: ModelLike, example_inputs: Any = None) -> GraphView:
    """A GraphView over a private copy of the model (the caller's model is never modified)."""
    if isinstance(model, ir.Model):
        return OnnxGraphView(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
    if _is_onnx(model):
        origin = str(model) if isinstance(model, (str, os.PathLike)) else "<ONNX model>"
        return OnnxGraphView(load_model(model), origin=origin)
    if isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        return FxGraphView(clone_graph_module(capture(model, example_inputs)))
    msg = f"cannot quantize a {type(model).__name__}: expected an nn.Module, ExportedProgram, ONNX model or .onnx path"
    raise ConfigError(msg)


def quantize_with_report(
    model: ModelLike,
    recipe: str | Path | Recipe | Mapping[str, Any],
    calibration: Any,
    *,
    example_inputs: Any = None,
    batch_size: int = 8,
    verify: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
    as_proto: bool = True,
    **lm_options: Any,
) -> QuantizeResult:
    """Capture, run the recipe's passes (verified), calibrate, quantize and lower.

    `calibration`: ONNX: a mapping {input: array}, a list of them, an .npz path, a folder of
    .npz (one feed each) or `qpass.Feeds` (explicit feeds, each run as is and verified on);
    torch: an iterable of batches or `Feeds`. See `qpass.data` for how mappings are batched.

    ONNX: `model` is a ModelProto, or with `as_proto=False` the onnx-ir Model itself (no
    serialized copy of a big model in memory; `quantize_file` saves it streaming).
    A transformers causal LM comes back as the same kind of model, quantized in its modules
    (`qpass.causal_lm`; `lm_options`: `tokenizer=` for text calibration, `seq_len=`, `inplace=`).
    """
    recipe = get_recipe(recipe)
    if _is_folder(model):  # an ONNX Runtime GenAI folder in, a folder out
        output_dir = lm_options.pop("output_dir", None)
        if output_dir is None:
            msg = f"{model}: a GenAI model folder is quantized into a folder; pass output_dir="
            raise ConfigError(msg)
        genai = {k: lm_options.pop(k) for k in ("seq_len", "max_rows") if k in lm_options}
        options = {"verify": verify, "tolerance": tolerance, "progress": progress, **lm_options}
        return quantize_genai(model, output_dir, recipe, calibration, GenAICalibration(**genai), **options)
    if is_causal_lm(model):  # a transformers LM: quantized in its own modules, still generates
        lm = quantize_causal_lm(
            model, recipe, calibration, verify=verify, tolerance=tolerance, progress=progress, **lm_options
        )
        return QuantizeResult(lm.model, lm.report, lm.recipe)
    if recipe.kv_cache is not None:
        msg = (
            f"recipe '{recipe.name}': key 'kv_cache' applies to transformers causal LMs (inside their cache); "
            f"a {type(model).__name__} has no cache qpass can quantize"
        )
        raise ConfigError(msg)
    if _is_onnx(model):
        view = open_view(model)
        batches = onnx_batches(view.model, calibration, batch_size)
    else:
        batches = torch_batches(calibration)
        view = open_view(model, example_inputs if example_inputs is not None else batches[0])
    report, plan = plan_recipe(view, recipe, batches, verify=verify, tolerance=tolerance, progress=progress)
    if plan is not None:
        lower(view, plan, recipe.lowering)
    if isinstance(view, OnnxGraphView):
        view.forget_inferred_shapes()
        try:
            finalize_onnx(view.model, recipe.lowering)
        except PassError as exc:
            if not _source_fails_the_same(model, exc):
                raise
            # the input already fails ONNX's full check the same way (an ONNX schema's own function
            # body, say): qpass's output is no worse than what it was given
        out: Any = view.to_proto() if as_proto else view.model
    else:
        out = view.gm
        out.meta["qpass_report"] = report
        out.meta["qpass_recipe"] = recipe.to_dict()
    return QuantizeResult(out, report, recipe)


def _is_folder(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and (is_genai_folder(model) or Path(model).is_dir())


def quantize_genai(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: str | Path | Recipe | Mapping[str, Any],
    calibration: Any,
    calib: GenAICalibration | None = None,
    **options: Any,
) -> QuantizeResult:
    """An ONNX Runtime GenAI folder to a new one that `og.Model(dst)` loads (`qpass.genai_folder`).

    `calibration`: a .txt path or a list of strings (tokenized by the folder's tokenizer.json into
    full rows, `calib`), token rows, or `Feeds`. Every row is calibrated and verified twice: as a
    prefill with an empty cache and as a decode step fed that prefill's present cache
    (`qpass.genai_feeds`). The result's `model` is the output folder's path.
    """
    folder = load_genai_folder(src)
    out = check_output_path(dst, (src,))
    if out.resolve() == folder.path.resolve() or folder.path.resolve() in out.resolve().parents:
        msg = f"{out}: the output folder is (inside) the input folder; choose another path"
        raise ConfigError(msg)
    feeds = calibration_feeds(folder, calibration, calib or GenAICalibration())
    result = quantize_with_report(str(folder.decoder), recipe, feeds, as_proto=False, **options)
    model = result.model
    config = updated_config(
        folder, [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    )
    with atomic_folder(out) as tmp:
        decoder = tmp / folder.decoder.relative_to(folder.path)
        decoder.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(model, decoder)
        copy_folder_rest(folder, tmp, config)
        (tmp / "qpass_recipe.yaml").write_text(result.recipe.to_yaml())
    return QuantizeResult(out, result.report, result.recipe)


def _source_fails_the_same(model: ModelLike, exc: PassError) -> bool:
    """Whether the user's model fails onnx.checker's full check with the same first line as `exc`."""
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as src:
        first = str(src).strip().splitlines()[0] if str(src).strip() else type(src).__name__
        unnamed = re.sub(r", node name: [^)]*", "", str(exc))  # the saved model names its nodes
        return unnamed.endswith(first)
    except (OSError, TypeError, ValueError):
        return False
    return False


def quantize(
    model: ModelLike, recipe: str | Path | Recipe | Mapping[str, Any], calibration: Any, **options: Any
) -> Any:
    """Quantize a model: nn.Module/ExportedProgram in, GraphModule out; ONNX in, ModelProto out;
    a transformers causal LM in, the same model class out (it still `generate()`s); an ONNX
    Runtime GenAI folder in (with `output_dir=`), the written output folder's path out.
    """
    return quantize_with_report(model, recipe, calibration, **options).model


def calibrate(
    model: Any, recipe: str | Path | Recipe | Mapping[str, Any], calibration: Any, **options: Any
) -> Any:
    """Prepare a transformers causal LM for `torch.compile(model.forward, backend="qpass",
    options={"recipe": recipe})`: run the recipe's verified passes and its calibration now, write
    the folded transforms into the model's parameters (its function unchanged, checked) and attach
    each linear's quantized form to its weight; the backend then lowers every graph dynamo hands it
    (prefill, decode, symbolic cache lengths) from what is attached. Returns `model`, changed in
    place. `options`: those of `qpass.quantize` for causal LMs (`tokenizer=`, `seq_len=`, `verify=`).

    Why attach instead of calibrating in the backend: dynamo's graphs arrive one by one at
    generation time (a decode step sees one token), not on calibration data.
    """
    if not is_causal_lm(model):
        msg = (
            f"qpass.calibrate attaches to transformers causal LMs; for a {type(model).__name__}, pass "
            "torch.compile(..., options={'recipe': ..., 'calibration': batches}) or use qpass.quantize"
        )
        raise ConfigError(msg)
    options.pop("inplace", None)
    return quantize_causal_lm(model, recipe, calibration, inplace=True, attach=True, **options).model


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: str | Path | Recipe | Mapping[str, Any],
    calibration: Any,
    **options: Any,
) -> QuantizeResult:
    """ONNX file to ONNX file; the input is opened read-only and the output written atomically.

    The result's `model` is the onnx-ir Model that was saved (see `quantize_with_report`).
    """
    check_output_path(dst, (src,))
    result = quantize_with_report(str(src), recipe, calibration, as_proto=False, **options)
    save_onnx(result.model, dst)
    return result
