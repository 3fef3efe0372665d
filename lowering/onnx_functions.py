"""Custom-domain ONNX ops with function bodies, so lowered models run in stock onnxruntime.

`qpass.HadamardTransform{n}(x, signs) = x @ (diag(signs) H_n)` and `qpass.Hadamard{n}(x) = x @ H_n`
over the last axis, H_n the orthonormal Hadamard matrix of `qpass.math.hadamard.hadamard`:
sqrt(n) H_n = B_m ⊗ S_2 ⊗ ... ⊗ S_2 (n = m 2^k). The body is a model-local FunctionProto built
with onnx-ir (its constants depend on n, which onnxscript's `@script` cannot unroll); runtimes
that know nothing of the `qpass` domain inline it.

How the body computes it, each choice measured in ONNX Runtime at 2 threads on [B, 128, n],
B = 1 and 32 (`benchmarks/onnx_hadamard.py`, `benchmarks/results/onnx_hadamard.md`):
- Kronecker chunks. Any grouping of consecutive factors is a factorisation (chunks
  (m 2^a, 2^b, ...)); each chunk is one MatMul on one axis of a reshaped view. Fewer MACs is not
  faster here: a chunk off the last axis is a broadcast [c, c] @ [rows, c, rest] MatMul that ORT
  runs as many small GEMMs ("kron"), or a flat GEMM between Transposes ("kron_t"), and each
  extra chunk costs more than its MACs save: 1536 = 12·16·8 (36 MAC / element) was ~2x slower
  than 48·32 (80 MAC). The fastest (form, chunks) per size is PLANS; other sizes take two even
  chunks (`default_plan`, the shape of every measured winner).
- 1/sqrt(n) lives in the last chunk's matrix: no op.
- The signs: a diagonal on the left of a Kronecker product does not factor into a chunk, so the
  rotate pass folds them offline into the producer where one takes a per-channel factor
  (up_proj's rows through the SwiGLU product, a norm's gamma and beta; exact, verified) and the
  op is the bare `Hadamard{n}`: one pass over the activation less. Where no producer can
  (MiniLM's GELU output), the signs stay one Mul.
- Butterflies (log2 p Add/Sub stages, O(n log n), `form="butterfly"`) lose to the chunk GEMMs:
  5 ops and a pass over memory per stage.
- What is left is memory-bound: against the linear it feeds (SmolLM2 down_proj 1536 -> 576 and
  MiniLM FFN down 1536 -> 384, as W4A8 MatMulIntegerToFloat), the rotation stays well above the
  issue's 10% target; a fused FWHT kernel (kernels/hadamard.py on the torch side) is what would
  reach it, and stock ORT has none.

`lower_rotations` replaces the inserted rotation MatMuls (`qpass.kind = rotation`) whose matrix
is diag(signs) H_n by this op where it is faster than the constant MatMul (see FWHT_MIN_SIZE).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from qpass.graph.onnx import KIND_KEY
from qpass.graph.refs import OpKind
from qpass.lowering.onnx_nodes import QPASS_DOMAIN
from qpass.math.hadamard import hadamard
from qpass.qconfig import RotationOp

# The function op (kron form) beat the constant MatMul 2.7-5.6x at n = 384, 576 and 1536, batch 1
# and 32 x 128 tokens, in ONNX Runtime on this machine (benchmarks/results/onnx_hadamard.md);
# below the smallest measured size the constant MatMul is kept.
FWHT_MIN_SIZE = 384
# (form, chunks) per n: the fastest measured (benchmarks/onnx_hadamard.py); other n: default_plan.
PLANS: dict[int, tuple[str, tuple[int, ...]]] = {
    384: ("kron", (24, 16)),
    576: ("kron", (36, 16)),
    1536: ("kron", (48, 32)),
}


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


def function_name(n: int, signed: bool = True) -> str:
    return f"HadamardTransform{n}" if signed else f"Hadamard{n}"


def _const(name: str, array: np.ndarray) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=name)
    node.outputs[0].name = name
    return node


def _sylvester(p: int) -> np.ndarray:
    s = np.array([[1.0]])
    while s.shape[0] < p:
        s = np.block([[s, s], [s, -s]])
    return s


def kron_chunks(n: int, chunks: tuple[int, ...]) -> list[np.ndarray]:
    """The ±1 matrices M_1..M_k with sqrt(n) hadamard(n) = M_1 ⊗ ... ⊗ M_k, of the given sizes.

    hadamard(n) sqrt(n) = B_m ⊗ S_2 ⊗ ... ⊗ S_2: any grouping of consecutive factors is a valid
    factorisation, so `chunks` must be (m 2^a, 2^b, ...), with product n.
    """
    base, p = sylvester_split(n)
    m = base.shape[0]
    if math.prod(chunks) != n or chunks[0] % m or any(c & (c - 1) for c in (chunks[0] // m, *chunks[1:])):
        msg = f"chunks {chunks} do not group hadamard({n}) = B_{m} x S_{p}"
        raise ValueError(msg)
    return [np.kron(base, _sylvester(chunks[0] // m)), *(_sylvester(c) for c in chunks[1:])]


def default_plan(n: int) -> tuple[str, tuple[int, ...]]:
    """(form, chunks) for a size not in PLANS.

    Two chunks, B_m times enough of the Sylvester factor to make them as even as possible: the
    shape of every measured winner.
    """
    base, p = sylvester_split(n)
    m = base.shape[0]
    if p == 1:
        return "kron", (m,)
    a = min(range(int(math.log2(p)) + 1), key=lambda a: abs(m * 2**a - p // 2**a))
    chunks = (m << a, p >> a)
    return "kron", tuple(c for c in chunks if c > 1) or (n,)


def hadamard_function(
    n: int, opset: int, form: str | None = None, *, chunks: tuple[int, ...] | None = None, signed: bool = True
) -> ir.Function:
    """The FunctionProto of `qpass.HadamardTransform{n}(x, signs)` (signs ±1), or, with
    `signed=False`, of `qpass.Hadamard{n}(x)`.

    form and chunks default to PLANS[n] (or default_plan(n)). form "kron": one MatMul per chunk,
    each on one axis of a reshaped view ([c, c] @ [rows, c, rest], no Transpose), 1/sqrt(n) folded
    into the last chunk's matrix: sum(chunks) MACs per element. "kron_t": every chunk as one
    flat [rows * rest, c] @ [c, c] GEMM, a Transpose rotating the axes after each. "butterfly": one [m, m]
    MatMul and log2(p) add/sub stages (O(n log n), but 5 ops per stage; slower, measured).
    """
    x = ir.Value(name="x")
    signs = ir.Value(name="signs") if signed else None
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

    def shape(*dims: int) -> ir.Value:
        return constant(np.asarray(dims, np.int64))

    plan_form, plan_chunks = PLANS.get(n) or default_plan(n)
    form = form or plan_form
    chunks = chunks or plan_chunks
    (orig_shape,) = add("Shape", [x])
    y = add("Mul", [x, signs])[0] if signed else x
    if form == "kron":
        mats = kron_chunks(n, chunks)
        mats[-1] = mats[-1] / math.sqrt(n)
        (y,) = add("Reshape", [y, shape(-1, mats[-1].shape[0])])
        (y,) = add("MatMul", [y, constant(mats[-1].astype(np.float32))])
        rest = mats[-1].shape[0]
        for mat in reversed(mats[:-1]):  # y[.., c, rest] <- M^T @ y: one axis, batched
            c = mat.shape[0]
            (y,) = add("Reshape", [y, shape(-1, c, rest)])
            (y,) = add("MatMul", [constant(np.ascontiguousarray(mat.T).astype(np.float32)), y])
            rest *= c
    elif form == "kron_t":
        mats = kron_chunks(n, chunks)
        mats[-1] = mats[-1] / math.sqrt(n)
        layout = [m.shape[0] for m in mats]
        k = len(layout)
        for mat in reversed(mats):  # GEMM on the last axis, then rotate the axes by one
            (y,) = add("Reshape", [y, shape(-1, mat.shape[0])])
            (y,) = add("MatMul", [y, constant(mat.astype(np.float32))])
            if k > 1:
                (y,) = add("Reshape", [y, shape(-1, *layout)])
                (y,) = add("Transpose", [y], perm=[0, k, *range(1, k)])
                layout = [layout[-1], *layout[:-1]]
    else:
        base, p = sylvester_split(n)
        m = n // p
        (y,) = add("Mul", [y, constant(np.asarray(1 / math.sqrt(n), np.float32))])
        h = 1
        while h < p:  # stage h: butterflies between channel bits of weight h
            (y,) = add("Reshape", [y, shape(-1, m, p // (2 * h), 2, h)])
            if opset >= 18:
                a, b = add("Split", [y], 2, axis=3, num_outputs=2)
            else:
                a, b = add("Split", [y], 2, axis=3)
            (s,) = add("Add", [a, b])
            (d,) = add("Sub", [a, b])
            (y,) = add("Concat", [s, d], axis=3)
            h *= 2
        if m > 1:
            (y,) = add("Reshape", [y, shape(-1, m, p)])
            (y,) = add("MatMul", [constant(np.ascontiguousarray(base.T).astype(np.float32)), y])
    (out,) = add("Reshape", [y, orig_shape])
    out.name = "y"
    name = function_name(n, signed)
    inputs = [x, signs] if signed else [x]
    graph = ir.Graph(inputs, [out], nodes=nodes, opset_imports={"": opset}, name=name)
    return ir.Function(QPASS_DOMAIN, name, graph=graph, attributes=[])


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


def lower_rotations(
    model: ir.Model,
    mode: RotationOp,
    opset: int,
    form: str | None = None,
    chunks: tuple[int, ...] | None = None,
) -> list[str]:
    """Replace Hadamard rotation MatMuls by the function op (per `mode`); returns the node names.

    A plain H (all signs +1: the rotate pass folded them into the producer) takes the one-input
    `qpass.Hadamard{n}`, with no sign Mul.
    """
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
        signed = bool((signs != 1).any())
        key = (QPASS_DOMAIN, function_name(n, signed), "")
        if key not in model.functions:
            model.functions[key] = hadamard_function(n, opset, form, chunks=chunks, signed=signed)
        model.opset_imports.setdefault(QPASS_DOMAIN, 1)
        inputs = [node.inputs[0]]
        if signed:
            sv = ir.Value(name=f"{q.name}_signs", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT))
            sv.const_value = ir.tensor(signs.astype(np.float32), name=sv.name)
            graph.register_initializer(sv)
            inputs.append(sv)
        new = ir.node(function_name(n, signed), inputs, domain=QPASS_DOMAIN, name=f"{node.name}_fwht")
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
