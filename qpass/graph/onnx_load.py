"""Reading an ONNX model into onnx-ir, refusing bad files with clear errors; never writes.

A path or proto is checked (the ONNX checker, a non-empty graph); weights in external data files
are checked to exist inside the model's folder and to be long enough, and stay memory-mapped
when the model is big. `OnnxGraphView` is built on what this returns.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir

from qpass import io as qio
from qpass.errors import ModelLoadError


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Load an ONNX model (path or proto) into onnx-ir, with a clear error for bad files. Never writes."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        proto = source
        origin = "<ModelProto>"
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            msg = f"{path}: no such ONNX file"
            raise ModelLoadError(msg)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            msg = f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
            raise ModelLoadError(msg) from exc
        if _external_tensors(proto):
            return _load_external(path, proto)
    _check(proto, proto, origin)
    return ir.serde.deserialize_model(proto)


def _check(checked: onnx.ModelProto | str, proto: onnx.ModelProto, origin: str) -> None:
    """The ONNX checker on `checked` (a path where external data exceeds protobuf's 2 GiB), and a
    non-empty graph; the first line of what fails, named by `origin`.
    """
    try:
        onnx.checker.check_model(checked, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        if not _runtime_op_only(first, proto):
            msg = f"{origin}: fails the ONNX checker: {first}"
            raise ModelLoadError(msg) from exc
    if not proto.graph.node:
        msg = f"{origin}: the ONNX graph has no nodes"
        raise ModelLoadError(msg)


_UNKNOWN_OP = re.compile(r"No Op registered for (\S+) with domain_version of \d+")


def _runtime_op_only(first: str, proto: onnx.ModelProto) -> bool:
    """Whether the checker only refused an op ONNX Runtime itself registers in the default domain.

    ONNX Runtime GenAI's builder writes `SimplifiedLayerNormalization` in the ONNX domain: ORT has
    the schema (and kernel), the ONNX checker does not. Such a model is not a bad file; ORT checks
    it when qpass builds its session to calibrate and verify.
    """
    match = _UNKNOWN_OP.search(first)
    if match is None:
        return False
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    op = match.group(1)
    domains = {n.domain for n in proto.graph.node if n.op_type == op}
    known = {(s.name, s.domain) for s in ort_state.get_all_operator_schema() if s.name == op}
    return bool(domains) and all((op, "" if d == "ai.onnx" else d) in known for d in domains)


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _load_external(path: Path, proto: onnx.ModelProto) -> ir.Model:
    """A model whose weights live in external data files: checked by path (no 2 GiB limit), every
    data file checked to exist inside the model's folder and to be long enough. Weights stay
    memory-mapped (onnx-ir reads them lazily) when the model is big; small ones are read in.
    """
    folder = path.parent.resolve()
    files: set[str] = set()
    for tensor in _external_tensors(proto):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        data = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in data.parents:
            msg = f"{path}: initializer '{tensor.name}' points outside the model's folder ('{location}')"
            raise ModelLoadError(msg)
        if not data.is_file():
            msg = f"{path}: initializer '{tensor.name}' reads missing external data file '{location}'"
            raise ModelLoadError(msg)
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > data.stat().st_size:
            msg = f"{path}: external data file '{location}' is truncated ('{tensor.name}' ends at byte {end})"
            raise ModelLoadError(msg)
        files.add(str(data))
    _check(str(path), proto, str(path))
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, folder)
    total = sum(
        int({e.key: e.value for e in t.external_data}.get("length", 0)) for t in _external_tensors(proto)
    )
    if total <= qio.EXTERNAL_DATA_THRESHOLD:
        model = ir.external_data.load_to_model(model)
    model.meta[qio.EXTERNAL_KEY] = sorted(files)
    return model


def lift_constants(graph: ir.Graph) -> None:
    """Constant nodes holding tensors become initializers, so passes can read and rescale them."""
    for node in list(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            out = node.outputs[0]
            if out.is_graph_output():  # a graph output stays the Constant's own: nothing to rescale
                continue
            tensor = node.attributes["value"].as_tensor()
            init = ir.Value(name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
            init.const_value = tensor
            graph.register_initializer(init)
            out.replace_all_uses_with(init)
            graph.remove(node, safe=True)
