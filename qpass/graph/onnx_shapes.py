"""Shapes for the values an ONNX file leaves without any, as passes need ranks and channel widths.

torch's legacy exporter with dynamic axes (the way many users export) writes no value_info at all:
every intermediate value has no shape, so a pass that reads a rank or a width would skip every
site. On load, `infer_missing_shapes` fills in what is missing, never overriding the file:

1. ONNX's own shape inference (strict off, data propagation on, so Shape -> Gather -> Concat ->
   Reshape chains keep their constant widths and symbolic dims);
2. where values are still without a rank, ONNX Runtime's symbolic shape inference (it knows
   contrib ops and merges symbolic dims), if it runs on the model at all.

Both run on a weightless copy: large initializers become graph inputs of the same type and shape,
so a big model is never copied into protobuf and the 2 GiB limit does not apply. A failing
inference leaves the shapes as they were (inference is a help, never a reason to refuse a model).

What was inferred is unchecked, so it must not reach the saved model: `InferredShapes.forget`
puts every value back as the file had it, and clears the shapes of values that passes or lowering
created afterwards (they may have copied an inferred shape).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

log = logging.getLogger("qpass")

_Found = tuple[ir.TypeProtocol | None, ir.Shape | None]  # (type, shape) of one value
_INLINE_LIMIT = 4096  # elements: initializers kept as data for inference (shape tensors, scalars, ...)


@dataclass
class InferredShapes:
    """The values whose type/shape came from inference, with what the file had for each."""

    original: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)  # every value name present when inference ran

    def __bool__(self) -> bool:
        return bool(self.original)

    def forget(self, graph: ir.Graph) -> None:
        """Undo inference before saving: the file's own types/shapes back; values created since
        load lose their shapes (any of them may carry an inferred one). Nothing to do when
        inference added nothing.
        """
        if not self.original:
            return
        for value in _values(graph):
            if value.name in self.original:
                value.type, value.shape = self.original[value.name]
            elif value.name not in self.loaded and not value.is_graph_input():
                value.shape = None


def _values(graph: ir.Graph) -> list[ir.Value]:
    """Node outputs and graph outputs of the top-level graph (inputs and initializers have shapes)."""
    out = [v for node in graph for v in node.outputs]
    out.extend(v for v in graph.outputs if v.producer() is None)
    return [v for v in out if not v.is_initializer()]


def _needs(value: ir.Value) -> bool:
    return value.shape is None or value.type is None


def _weightless(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with large initializers turned into typed graph inputs."""
    graph = model.graph
    big = {
        name: v
        for name, v in graph.initializers.items()
        if v.const_value is None or v.const_value.size > _INLINE_LIMIT or isinstance(v.const_value, ir.ExternalTensor)
    }
    saved = {name: v.const_value for name, v in big.items()}
    inputs, order = list(graph.inputs), list(graph.initializers)
    try:
        for name, v in big.items():
            graph.initializers.pop(name)
            v.const_value = None
            if v.shape is None and saved[name] is not None:
                v.shape = ir.Shape(saved[name].shape)
            graph.inputs.append(v)
        return ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for name, v in big.items():
            v.const_value = saved[name]
        kept = [graph.initializers.pop(name) for name in order if name not in big]
        for v in (big.get(name) or kept.pop(0) for name in order):
            graph.register_initializer(v)


def _shape_of(vi: onnx.ValueInfoProto) -> _Found:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None or tt.elem_type == onnx.TensorProto.UNDEFINED:
        return None, None
    dtype = ir.TensorType(ir.DataType(tt.elem_type))
    if not tt.HasField("shape"):
        return dtype, None
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return dtype, ir.Shape(dims)


def _inferred(proto: onnx.ModelProto) -> dict[str, _Found]:
    g = proto.graph
    return {vi.name: _shape_of(vi) for vi in (*g.value_info, *g.output)}


def _onnx_inference(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is a help; the model stays as the file had it
        log.debug("ONNX shape inference failed: %s", exc)
        return None


def _ort_inference(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

        if (get_opset(proto) or 0) < 7:
            return None
        # SymbolicShapeInference.infer_shapes, minus its side effect: when inference is incomplete
        # it saves the model as "sym_shape_infer_temp.onnx" plus a <uuid>.data file into the
        # current directory before raising. Driving the same steps here keeps the user's working
        # directory clean and keeps the dims it did find.
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(proto)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as exc:  # noqa: BLE001 - it refuses ops it does not know; keep what ONNX found
        log.debug("ONNX Runtime symbolic shape inference failed: %s", exc)
        return None
    return inference.out_mp_


_PROBES = ((7, 11, 13, 17, 23, 29, 31, 37), (41, 43, 47, 53, 59, 61, 67, 71))  # distinct primes


def _probe(proto: onnx.ModelProto, sizes: tuple[int, ...]) -> dict[str, _Found] | None:
    """ONNX inference with every dynamic input dim set to a size (one per dim name), or None when
    the graph inputs have no dynamic dims (the plain inference is then already concrete).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    chosen: dict[str, int] = {}
    for inp in probe.graph.input:
        if not inp.type.HasField("tensor_type") or not inp.type.tensor_type.HasField("shape"):
            continue
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                key = d.dim_param or f"<unnamed {len(chosen)}>"
                d.dim_value = chosen.setdefault(key, sizes[len(chosen) % len(sizes)])
    if not chosen:
        return None
    result = _onnx_inference(probe)
    return _inferred(result) if result is not None else None


def _merge(plain: _Found, a: _Found | None, b: _Found | None) -> _Found:
    """A dim that both probes agree on is static; one that follows the input sizes stays symbolic
    (plain inference's name for it, else unknown).
    """
    dtype, shape = plain
    if a is None or b is None or a[1] is None or b[1] is None or len(a[1]) != len(b[1]):
        return plain
    names = list(shape) if shape is not None and len(shape) == len(a[1]) else [None] * len(a[1])
    dims = []
    for da, db, dp in zip(a[1], b[1], names, strict=True):
        if isinstance(da, int) and da == db:
            dims.append(da)
        else:
            dims.append(dp if isinstance(dp, ir.SymbolicDim) and dp.value is not None else None)
    return dtype or a[0], ir.Shape(dims)


def infer_missing_shapes(model: ir.Model) -> InferredShapes:
    """Fill in the top-level values that have no type or shape; see the module docstring."""
    record = InferredShapes()
    graph = model.graph
    values = _values(graph)
    missing = [v for v in values if _needs(v)]
    if not missing:
        return record
    record.loaded = {v.name for v in values} | {v.name for v in graph.inputs} | set(graph.initializers)
    proto = _weightless(model)
    plain_result = _onnx_inference(proto)
    plain = _inferred(plain_result) if plain_result is not None else {}
    probes = [_probe(proto, sizes) for sizes in _PROBES]
    found: dict[str, _Found] = {}
    for v in missing:
        base = plain.get(v.name, (None, None))
        a, b = ((p or {}).get(v.name) for p in probes)
        found[v.name] = _merge(base, a, b) if probes[0] is not None else base
    if any(found[v.name][1] is None for v in missing):
        ort_result = _ort_inference(plain_result if plain_result is not None else proto)
        if ort_result is not None:
            for name, (dtype, shape) in _inferred(ort_result).items():
                if name in found and found[name][1] is None and shape is not None:
                    found[name] = (dtype, shape)
    for v in missing:
        dtype, shape = found[v.name]
        if dtype is None and shape is None:
            continue
        record.original[v.name] = (v.type, v.shape)
        if v.type is None and dtype is not None:
            v.type = dtype
        if v.shape is None and shape is not None:
            v.shape = shape
    return record
