"""ONNX Runtime decodes what qpass packed: a one-node probe of each MatMulNBits layout.

Why: MatMulNBits' initializers (nibble order, zero points packed or in the scales' type, g_idx,
padded last blocks) are a contract with ORT's kernel that qpass's numpy packing can only
assume. A packing mistake would not fail: ORT would run and the model would be wrong. So the
first linear of every distinct layout (bits, block size, kind of zero points, g_idx) in a
lowering is run in ORT on rows of the identity matrix, which read back the dequantized weight
columns of its first and last blocks, and compared with qpass's own dequantized weight.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qpass.errors import UnsupportedOpError
from qpass.lowering.weight_packing import PackedNBits
from qpass.threads import ort_session_options


def layout_key(packed: PackedNBits) -> tuple:
    """What decides how ORT reads the initializers (not their values)."""
    zp = packed.zero_points
    return (
        packed.bits,
        packed.block_size,
        None if zp is None else zp.dtype.str,
        packed.g_idx is not None,
        packed.k % packed.block_size != 0,
    )


def _probe_columns(k: int, block: int) -> np.ndarray:
    first = np.arange(min(k, block))
    last = np.arange(max(0, k - block), k)
    return np.unique(np.concatenate([first, last]))


def check_matmulnbits(packed: PackedNBits, expected: np.ndarray, where: str, accuracy_level: int = 0) -> None:
    """Raise when ORT's MatMulNBits decodes `packed` to other weights than `expected` [N, K]."""
    cols = _probe_columns(packed.k, packed.block_size)
    a = np.zeros((cols.size, packed.k), np.float32)
    a[np.arange(cols.size), cols] = 1.0
    inits = [
        onnx.numpy_helper.from_array(packed.b, "b"),
        onnx.numpy_helper.from_array(packed.scales, "s"),
    ]
    names = ["a", "b", "s"]
    if packed.zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(packed.zero_points, "z"))
        names.append("z")
    if packed.g_idx is not None:
        names += [""] * (4 - len(names))
        inits.append(onnx.numpy_helper.from_array(packed.g_idx, "g"))
        names.append("g")
    node = helper.make_node(
        "MatMulNBits", names, ["y"], domain="com.microsoft",
        K=packed.k, N=packed.n, bits=packed.bits, block_size=packed.block_size, accuracy_level=accuracy_level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "nbits_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [cols.size, packed.k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [cols.size, packed.n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    import onnxruntime as ort

    sess = ort.InferenceSession(
        model.SerializeToString(), ort_session_options(log_severity_level=3), providers=["CPUExecutionProvider"]
    )
    (y,) = sess.run(None, {"a": a})
    want = expected[:, cols].T.astype(np.float32)
    tol = 1e-5 * max(float(np.abs(want).max()), 1e-12) + 1e-7
    # accuracy_level 4 quantizes A to int8 on the fly: identity rows stay exact, scales round
    if accuracy_level == 4:
        tol *= 100
    diff = float(np.abs(y - want).max())
    if not diff <= tol:
        msg = (
            f"node '{where}': ONNX Runtime's MatMulNBits reads the packed weights as other values than "
            f"qpass's quantized ones (max difference {diff:.3g}, layout bits={packed.bits}, "
            f"block_size={packed.block_size}, zero points {layout_key(packed)[2]}, g_idx "
            f"{packed.g_idx is not None}); refusing to write a wrong model"
        )
        raise UnsupportedOpError(msg)
