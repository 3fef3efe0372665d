"""Running an onnx-ir model in ONNX Runtime, as `OnnxGraphView` does to calibrate and verify.

Builds CPU sessions (from memory, or from a temporary copy on disk when the weights are still
memory-mapped external data) that may also return intermediate values, and turns ONNX Runtime's
own exceptions into qpass errors that name the model and, where it can, the node.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from qpass import io as qio
from qpass.errors import CalibrationError, ModelLoadError, UnsupportedOpError
from qpass.threads import ort_session_options


def ort_session(
    model: ir.Model, values: Mapping[str, ir.Value], extra_outputs: tuple[str, ...], origin: str
) -> Any:
    """A CPU session over `model` that also returns the values named in `extra_outputs`."""
    import onnxruntime as ort

    opts = ort_session_options(log_severity_level=3)
    try:
        if is_lazy(model.graph):
            return _session_from_files(model, values, extra_outputs, opts)
        proto = ir.serde.serialize_model(model)
        existing = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise _runtime_error(model.graph, origin, exc) from exc


def is_lazy(graph: ir.Graph) -> bool:
    """Weights still memory-mapped from external data (a big model): ORT must load from files."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())


def _session_from_files(
    model: ir.Model, values: Mapping[str, ir.Value], extra_outputs: tuple[str, ...], opts: Any
) -> Any:
    """A session over a copy written with external data to a temp folder (protobuf cannot hold
    a model over 2 GiB in one message); the copy is removed once ONNX Runtime has loaded it.
    """
    import onnxruntime as ort

    graph = model.graph
    added = [values[n] for n in extra_outputs if not values[n].is_graph_output()]
    graph.outputs.extend(added)
    try:
        with tempfile.TemporaryDirectory(prefix="qpass-ort-") as folder:
            path = Path(folder) / "model.onnx"
            try:
                ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
            finally:
                qio.release_external(model)
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        for value in added:
            graph.outputs.remove(value)


def _runtime_error(graph: ir.Graph, origin: str, exc: Exception) -> Exception:
    """A clear error for a model ONNX Runtime refuses, naming the node it has no kernel for."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    for node in graph:
        domain = node.domain or "ai.onnx"
        if f"{domain}:{node.op_type}(" in text or f"{node.domain}:{node.op_type}(" in text:
            msg = (
                f"{origin}: ONNX Runtime cannot run node '{node.name}' ({domain}:{node.op_type}); "
                f"qpass runs the model to calibrate and verify, so every op needs a kernel ({first})"
            )
            return UnsupportedOpError(msg)
    msg = f"{origin}: ONNX Runtime cannot load the model ({first})"
    return ModelLoadError(msg)


def run_session(sess: Any, names: list[str] | None, feeds: Mapping[str, Any], origin: str) -> list[Any]:
    """`sess.run` on one calibration batch (torch tensors or arrays); a failure is a CalibrationError."""
    try:
        return sess.run(names, _numpy_feeds(feeds))
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        msg = f"{origin}: ONNX Runtime failed on a calibration batch ({first})"
        raise CalibrationError(msg) from exc


def _numpy_feeds(feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feeds.items()}
