"""Custom-domain ONNX ops with function bodies, so lowered models run in stock onnxruntime.

`qpass.HadamardTransform{n}(x, signs) = x @ (diag(signs) H_n)` over the last axis, with H_n the
orthonormal Hadamard matrix of `passes.rotation_math.hadamard` (B_m ⊗ Sylvester_p / sqrt(n),
n = m * p, p = 2^k). The body computes it in Kronecker form: the signs (with 1/sqrt(n) folded
in) scale x, viewed as [rows, m, p]; the Sylvester factor is applied to the trailing p channels,
either by one [p, p] MatMul (default, fastest measured) or by k butterfly stages (Reshape, Split,
Add, Sub, Concat; O(n log n)) as `rotation_math.fwht` does; one m x m MatMul applies B.

The body is a model-local FunctionProto built with onnx-ir (the stages and constants depend on
n, which onnxscript's `@script` cannot unroll); runtimes that know nothing of the `qpass` domain
inline it.

`lower_rotations` replaces the inserted rotation MatMuls (`qpass.kind = rotation`) whose matrix
is diag(signs) H_n by this op where it is faster. Measured by `benchmarks/onnx_hadamard.py`
(`benchmarks/results/onnx_hadamard.md`): see `FWHT_MIN_SIZE`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from passes.rotation_math import hadamard
from qpass.graph.onnx import KIND_KEY
from qpass.graph.view import OpKind
from qpass.qconfig import RotationOp

DOMAIN = "qpass"
# The function op (kron form) beat the constant MatMul 2.7-5.6x at n = 384, 576 and 1536, batch 1
# and 32 x 128 tokens, in ONNX Runtime on this machine (benchmarks/results/onnx_hadamard.md);
# below the smallest measured size the constant MatMul is kept.
FWHT_MIN_SIZE = 384


def sylvester_split(n: int) -> tuple[np.ndarray, int]:
    """(B [m, m] with ±1 entries, p) such that hadamard(n) = kron(B, S_p) / sqrt(n), p maximal."""
    h = hadamard(n, dtype=torch.float64).numpy() * math.sqrt(n)
    p = n & -n
    while p > 1:
        base = h[::p, ::p]
        if np.array_equal(np.kron(base, _sylvester(p)), h):
            return base, p
        p //= 2
    return h, 1


def function_name(n: int) -> str:
    return f"HadamardTransform{n}"


def _const(name: str, array: np.ndarray) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=name)
    node.outputs[0].name = name
    return node


def _sylvester(p: int) -> np.ndarray:
    s = np.array([[1.0]])
    while s.shape[0] < p:
        s = np.block([[s, s], [s, -s]])
    return s


def hadamard_function(n: int, opset: int, form: str = "kron") -> ir.Function:
    """The FunctionProto of `qpass.HadamardTransform{n}(x, signs)` (signs already / sqrt(n)).

    form "kron" (default): one [p, p] MatMul for the Sylvester factor (O(n (p + m)) per row: 2-5x
    faster than the constant MatMul and than the butterflies at n = 384..1536, measured);
    "butterfly": log2(p) add/sub stages for it (O(n log n), but 5 ops per stage).
    """
    base, p = sylvester_split(n)
    m = n // p
    x = ir.Value(name="x")
    signs = ir.Value(name="signs")
    nodes: list[ir.Node] = []

    def add(op: str, inputs, n_out: int = 1, **attrs) -> list[ir.Value]:
        node = ir.node(op, inputs, attributes=attrs or None, num_outputs=n_out, name=f"n{len(nodes)}")
        for i, out in enumerate(node.outputs):
            out.name = f"v{len(nodes)}_{i}"
        nodes.append(node)
        return list(node.outputs)

    def constant(array: np.ndarray) -> ir.Value:
        node = _const(f"c{len(nodes)}", array)
        nodes.append(node)
        return node.outputs[0]

    (shape,) = add("Shape", [x])
    (y,) = add("Mul", [x, signs])
    h = 1 if form == "butterfly" else p
    if form == "kron" and p > 1:
        (y,) = add("Reshape", [y, constant(np.asarray([-1, m, p], np.int64))])
        (y,) = add("MatMul", [y, constant(_sylvester(p).astype(np.float32))])
    while h < p:  # stage h: butterflies between channel bits of weight h
        (y,) = add("Reshape", [y, constant(np.asarray([-1, m, p // (2 * h), 2, h], np.int64))])
        if opset >= 18:
            a, b = add("Split", [y], 2, axis=3, num_outputs=2)
        else:
            a, b = add("Split", [y], 2, axis=3)
        (s,) = add("Add", [a, b])
        (d,) = add("Sub", [a, b])
        (y,) = add("Concat", [s, d], axis=3)
        h *= 2
    if m > 1:
        (y,) = add("Reshape", [y, constant(np.asarray([-1, m, p], np.int64))])
        (y,) = add("MatMul", [constant(np.ascontiguousarray(base.T).astype(np.float32)), y])
    (out,) = add("Reshape", [y, shape])
    out.name = "y"
    graph = ir.Graph([x, signs], [out], nodes=nodes, opset_imports={"": opset}, name=function_name(n))
    return ir.Function(DOMAIN, function_name(n), graph=graph, attributes=[])


def hadamard_signs(matrix: np.ndarray) -> np.ndarray | None:
    """The signs with matrix == diag(signs) @ hadamard(n), or None if it is not of that form."""
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != n or n < 2:
        return None
    try:
        h = hadamard(n, dtype=torch.float64).numpy()
    except Exception:  # no construction for n: not a Hadamard rotation
        return None
    s = np.sign(matrix[:, 0].astype(np.float64) * h[:, 0])
    if not np.allclose(matrix, s[:, None] * h, rtol=0, atol=1e-6 / math.sqrt(n)):
        return None
    return s


def lower_rotations(model: ir.Model, mode: RotationOp, opset: int, form: str = "kron") -> list[str]:
    """Replace Hadamard rotation MatMuls by the function op (per `mode`); returns the node names."""
    if mode is RotationOp.MATMUL:
        return []
    graph = model.graph
    done = []
    for node in list(graph):
        if node.metadata_props.get(KIND_KEY) != OpKind.ROTATION.value or node.op_type != "MatMul":
            continue
        q = node.inputs[1]
        if q is None or q.const_value is None:
            continue
        matrix = q.const_value.numpy()
        signs = hadamard_signs(matrix)
        n = matrix.shape[0]
        if signs is None or (mode is RotationOp.AUTO and n < FWHT_MIN_SIZE):
            continue
        key = (DOMAIN, function_name(n), "")
        if key not in model.functions:
            model.functions[key] = hadamard_function(n, opset, form)
        model.opset_imports.setdefault(DOMAIN, 1)
        sv = ir.Value(name=f"{q.name}_signs", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT))
        sv.const_value = ir.tensor((signs / math.sqrt(n)).astype(np.float32), name=sv.name)
        graph.register_initializer(sv)
        new = ir.node(function_name(n), [node.inputs[0], sv], domain=DOMAIN, name=f"{node.name}_fwht")
        new.metadata_props[KIND_KEY] = OpKind.ROTATION.value
        old = node.outputs[0]
        new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = (
            old.name + "_fwht",
            old.shape,
            old.type,
        )
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old], [new.outputs[0]])
        if not q.uses() and q.is_initializer():
            graph.initializers.pop(q.name)
        done.append(new.name)
    return done
