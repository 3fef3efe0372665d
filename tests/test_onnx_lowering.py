"""ONNX Runtime lowering of quantized linears, checked against the quantization math.

Every case builds a small real ONNX model, quantizes it with `qpass.quantize` and runs the
result in a stock onnxruntime CPU session; the reference is `QLinear.dequantized_weight()` (and
`fake_quant_act` for activations) from the plan that produced it.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qpass.api import quantize_with_report
from qpass.errors import ConfigError, PassError, UnsupportedOpError
from qpass.graph.onnx import KIND_KEY
from qpass.lowering.onnx_finalize import check_lowered
from qpass.lowering.onnx_functions import hadamard_function, kron_chunks, lower_rotations, sylvester_split
from qpass.lowering.weight_packing import _pack_nibbles
from qpass.math.hadamard import hadamard, random_signs, randomized_hadamard
from qpass.qconfig import RotationOp
from qpass.quant.qlinear import fake_quant_act

N_OUT = 40


def linear_model(
    k: int, opset: int = 18, seq: bool = False, gemm: bool = False
) -> tuple[onnx.ModelProto, np.ndarray]:
    """A linear: x [B, (T,) K] -> MatMul(W) + b (or Gemm transB) -> y; W with an outlier input channel."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, N_OUT)).astype(np.float32)
    w[5] *= 10.0
    b = rng.standard_normal(N_OUT).astype(np.float32)
    lead = ["B", "T"] if seq else ["B"]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "W"), numpy_helper.from_array(b, "b")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, N_OUT])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), b


def inputs(k: int, seq: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, k) if seq else (48, k)).astype(np.float32)
    x[..., 3] *= 25.0  # an outlier channel
    x[0, 1] = 0.0  # an all-zero token
    return x


def run(model: onnx.ModelProto, x: np.ndarray, **config: str) -> np.ndarray:
    so = ort.SessionOptions()
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def quantize(model, recipe, x):
    res = quantize_with_report(model, recipe, {"x": x}, verify=False)
    (q,) = [e.qlinear for e in res.report.results[-1].plan.edits]
    return res.model, q


def rel_max(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------ MatMulNBits

NBITS_CASES = [
    # (weights config, K): blocks of the group itself, blocks tiling a group (48 = 3 x 16),
    # 8-bit with zero points, per channel with K not a multiple of the block, 3-bit in 4-bit
    ({"format": "int4", "group": 64, "symmetric": True}, 256),
    ({"format": "int4", "group": 48, "symmetric": False}, 240),
    ({"format": "int8", "group": 16, "symmetric": False}, 240),
    ({"format": "int4", "group": None, "symmetric": True}, 200),
    ({"format": "int4", "group": None, "symmetric": False}, 200),
    ({"format": "int3", "group": 32, "symmetric": False}, 256),
]


@pytest.mark.parametrize(("wcfg", "k"), NBITS_CASES, ids=lambda v: str(v))
def test_matmulnbits_equals_dequantized_weight(wcfg, k):
    model, b = linear_model(k)
    x = inputs(k)
    recipe = {"weights": wcfg, "lowering": {"weight_op": "matmulnbits", "accuracy_level": 1}}
    out_model, q = quantize(model, recipe, x)
    assert op_types(out_model) == ["MatMulNBits", "Add"]
    node = out_model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["accuracy_level"] == 1
    assert attrs["bits"] == (4 if q.bits <= 4 else 8) and attrs["K"] == k and attrs["N"] == N_OUT
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5
    # the float weight is gone: 4-bit packs two codes per byte
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in out_model.graph.initializer}
    assert "W" not in sizes
    assert (
        sizes[node.input[1]]
        <= N_OUT * -(-k // attrs["block_size"]) * attrs["block_size"] * attrs["bits"] // 8
    )


@pytest.mark.parametrize("g_idx", [True, False], ids=["g_idx-input", "permuted-input"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_matmulnbits_act_order(symmetric, g_idx):
    k = 256
    model, b = linear_model(k)
    x = inputs(k)
    wcfg = {"format": "int4", "group": 32, "symmetric": symmetric, "algo": "gptq", "act_order": True}
    out_model, q = quantize(model, {"weights": wcfg, "lowering": {"g_idx": g_idx}}, x)
    assert q.g_idx is not None and not torch.equal(q.g_idx, torch.arange(k) // 32)
    node = next(n for n in out_model.graph.node if n.op_type == "MatMulNBits")
    if g_idx:  # ORT's g_idx input (asymmetric: float zero points, see weight_packing)
        assert op_types(out_model) == ["MatMulNBits", "Add"] and len(node.input) == 5 and node.input[4]
    else:  # input channels permuted by one Gather, groups contiguous, no g_idx
        assert op_types(out_model) == ["Gather", "MatMulNBits", "Add"] and len(node.input) <= 4
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5


def test_gptq_static_groups_needs_no_permutation():
    """`weights.static_groups` (the w4a16-gptq recipe): act-order GPTQ with groups in channel order,
    so MatMulNBits takes the input as is (no Gather, no g_idx) and equals the reference.
    """
    k = 256
    model, b = linear_model(k)
    x = inputs(k)
    wcfg = {"format": "int4", "group": 32, "symmetric": True, "algo": "gptq", "act_order": True}
    out_model, q = quantize(model, {"weights": {**wcfg, "static_groups": True}}, x)
    assert q.g_idx is None and op_types(out_model) == ["MatMulNBits", "Add"]
    node = next(n for n in out_model.graph.node if n.op_type == "MatMulNBits")
    assert len(node.input) <= 4
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5
    _, q_dynamic = quantize(model, {"weights": wcfg}, x)  # a different GPTQ: not the dynamic groups
    assert not torch.equal(q.codes, q_dynamic.codes)


def test_nibble_order_is_low_first():
    u = np.arange(16, dtype=np.uint8).reshape(1, 16)
    assert _pack_nibbles(u)[0, 0] == 0x10 and _pack_nibbles(u)[0, 7] == 0xFE
    assert _pack_nibbles(np.array([[3, 4, 5]], np.uint8)).tolist() == [[0x43, 0x05]]


def test_gemm_transb_lowers_with_bias():
    model, b = linear_model(128, gemm=True)
    x = inputs(128)
    out_model, q = quantize(model, {"weights": {"format": "int4", "group": 32}}, x)
    assert op_types(out_model) == ["MatMulNBits", "Add"]
    assert rel_max(run(out_model, x), x @ q.dequantized_weight().numpy().T + b) < 1e-5


# ------------------------------------------------------------------------------ blocked DequantizeLinear

# ORT rewrites DequantizeLinear + MatMul to MatMulNBits at this accuracy level (default 4: int8 A)
EXACT = {"session.qdq_matmulnbits_accuracy_level": "1"}


@pytest.mark.parametrize(
    "wcfg",
    [
        {"format": "int4", "group": 48, "symmetric": False},
        {"format": "int4", "group": 32, "symmetric": True, "algo": "gptq", "act_order": True},
        {"format": "int8", "group": None, "symmetric": True},
    ],
    ids=["int4-asym-g48", "int4-gptq-act-order", "int8-per-channel"],
)
def test_blocked_dequantize_linear(wcfg):
    k = 192
    model, b = linear_model(k, opset=21)
    x = inputs(k)
    out_model, q = quantize(model, {"weights": wcfg, "lowering": {"weight_op": "dequantize_linear"}}, x)
    ops = op_types(out_model)
    assert "DequantizeLinear" in ops and "MatMul" in ops and "MatMulNBits" not in ops
    assert ("Gather" in ops) == (q.g_idx is not None)  # act-order: input channels permuted
    dq = next(n for n in out_model.graph.node if n.op_type == "DequantizeLinear")
    codes = next(t for t in out_model.graph.initializer if t.name == dq.input[0])
    bits = int(wcfg["format"][3:])
    assert codes.data_type == getattr(TensorProto, f"{'' if wcfg['symmetric'] else 'U'}INT{bits}")
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x, **EXACT), ref) < 1e-5


def test_blocked_dequantize_linear_needs_opset_21():
    model, _ = linear_model(64)
    with pytest.raises(UnsupportedOpError, match=r"lowering\.weight_op.*opset >= 21.*opset 18"):
        quantize(
            model,
            {"weights": {"format": "int4", "group": 32}, "lowering": {"weight_op": "dequantize_linear"}},
            inputs(64),
        )


# ------------------------------------------------------------------------------ activations


@pytest.mark.parametrize(
    ("wfmt", "acfg"),
    [
        ("int8", {"format": "int8", "granularity": "per_token", "dynamic": True}),
        ("int4", {"format": "int8", "granularity": "per_token", "dynamic": True}),
        ("int4", {"format": "int4", "granularity": "per_token", "dynamic": True}),
        ("int8", {"format": "int8", "granularity": "per_tensor", "dynamic": True}),
    ],
    ids=["w8a8-token", "w4a8-token", "w4a4-token", "w8a8-dyn-tensor"],
)
def test_dynamic_activations_on_matmulintegertofloat(wfmt, acfg):
    k = 96
    model, b = linear_model(k, seq=True)
    x = inputs(k, seq=True)
    out_model, q = quantize(model, {"weights": {"format": wfmt}, "activations": acfg}, x)
    ops = collections.Counter(op_types(out_model))
    assert ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0
    # per token: x / s then QuantizeLinear, row-scale Mul after; per tensor: the scale is a_scale
    assert (ops["Mul"], ops["Div"]) == ((1, 2) if acfg["granularity"] == "per_token" else (0, 1)), ops
    ref = (fake_quant_act(torch.from_numpy(x), q.act, None) @ q.dequantized_weight().T).numpy() + b
    out = run(out_model, x)
    assert rel_max(out, ref) < 1e-5
    if acfg["granularity"] == "per_token":  # a token quantizes alike whatever batch it is in
        np.testing.assert_allclose(run(out_model, x[1:2]), out[1:2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dynamic", [True, False])
def test_quantized_activations_before_matmulnbits(dynamic):
    k = 128
    model, b = linear_model(k, seq=True)
    x = inputs(k, seq=True)
    acfg = {"format": "int8", "granularity": "per_token" if dynamic else "per_tensor", "dynamic": dynamic}
    out_model, q = quantize(
        model, {"weights": {"format": "int4", "group": 32, "symmetric": False}, "activations": acfg}, x
    )
    ops = op_types(out_model)
    assert "MatMulNBits" in ops and ("QuantizeLinear" in ops) != dynamic
    xq = fake_quant_act(torch.from_numpy(x), q.act, q.act_qparams)
    ref = (xq @ q.dequantized_weight().T).numpy() + b
    assert rel_max(run(out_model, x), ref) < 1e-5


# ------------------------------------------------------------------------------ config errors


def test_lowering_config_errors_name_the_key():
    model, _ = linear_model(64)
    with pytest.raises(ConfigError, match=r"lowering\.accuracy_level"):
        quantize(model, {"weights": {"format": "int4"}, "lowering": {"accuracy_level": 7}}, inputs(64))
    with pytest.raises(ConfigError, match=r"lowering\.weight_op"):
        quantize(model, {"weights": {"format": "int4"}, "lowering": {"weight_op": "qlinear"}}, inputs(64))
    with pytest.raises(ConfigError, match=r"lowering\.nope"):
        quantize(model, {"weights": {"format": "int4"}, "lowering": {"nope": 1}}, inputs(64))
    model, _ = linear_model(48)
    with pytest.raises(UnsupportedOpError, match=r"node 'MatMul_0'.*MatMulNBits.*weights\.group.*24"):
        quantize(model, {"weights": {"format": "int4", "group": 24}}, inputs(48))


# ------------------------------------------------------------------------------ Hadamard function op


def rotation_model(n: int, matrix: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "Q"], ["y"], name="rotate")
    node.metadata_props.add(key=KIND_KEY, value="rotation")
    graph = helper.make_graph(
        [node],
        "rot",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
        [numpy_helper.from_array(matrix, "Q")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("n", [16, 12, 28, 384, 576])
@pytest.mark.parametrize("form", ["kron", "kron_t", "butterfly"])
def test_hadamard_function_equals_matmul(n, form):
    q = randomized_hadamard(n, 7).to(torch.float32).numpy()
    proto = rotation_model(n, q)
    model = ir.serde.deserialize_model(proto)
    assert lower_rotations(model, RotationOp.FWHT, 18, form) == ["rotate_fwht"]
    lowered = ir.serde.serialize_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [n.op_type for n in lowered.graph.node] == [f"HadamardTransform{n}"]
    assert len(lowered.functions) == 1 and lowered.functions[0].domain == "qpass"
    x = np.random.default_rng(0).standard_normal((2, 5, n)).astype(np.float32)
    expect = x @ q
    assert rel_max(run(lowered, x), expect) < 1e-5
    assert rel_max(run(proto, x), expect) < 1e-5


def test_auto_keeps_small_rotations_and_non_hadamard_as_matmul():
    small = rotation_model(64, hadamard(64, dtype=torch.float32).numpy())
    model = ir.serde.deserialize_model(small)
    assert lower_rotations(model, RotationOp.AUTO, 18) == []  # below the measured crossover
    assert lower_rotations(model, RotationOp.FWHT, 18) == ["rotate_fwht"]
    q, _ = torch.linalg.qr(torch.randn(384, 384, generator=torch.Generator().manual_seed(0)))
    dense = ir.serde.deserialize_model(rotation_model(384, q.numpy().astype(np.float32)))
    assert lower_rotations(dense, RotationOp.FWHT, 18) == []  # not diag(s) H: stays a MatMul


def test_function_body_sizes():
    base, p = sylvester_split(1536)
    assert base.shape == (12, 12) and p == 128  # 1536 = 12 x 2^7
    butterfly = hadamard_function(1536, 18, "butterfly")
    assert sum(1 for node in butterfly if node.op_type == "Concat") == 7  # log2(p) stages
    kron = hadamard_function(1536, 18, "kron", chunks=(12, 16, 8))
    assert sum(1 for node in kron if node.op_type == "MatMul") == 3  # one per chunk: 36 MAC / element
    assert sum(1 for node in kron if node.op_type == "Mul") == 1  # the signs; 1/sqrt(n) is in a chunk
    plain = hadamard_function(1536, 18, "kron", signed=False)
    assert not any(node.op_type == "Mul" for node in plain) and len(plain.inputs) == 1
    with pytest.raises(ValueError, match="do not group"):
        kron_chunks(1536, (16, 12, 8))  # B_12 must lead


@pytest.mark.parametrize("form", ["kron", "kron_t"])
@pytest.mark.parametrize(
    ("n", "chunks"), [(1536, (12, 16, 8)), (1536, (96, 16)), (576, (36, 4, 4)), (384, (48, 8))]
)
def test_hadamard_chunkings_equal_matmul(n, chunks, form):
    for signs in (random_signs(n, 3), torch.ones(n, dtype=torch.float64)):
        q = (signs[:, None] * hadamard(n)).to(torch.float32).numpy()
        model = ir.serde.deserialize_model(rotation_model(n, q))
        assert lower_rotations(model, RotationOp.FWHT, 18, form, chunks) == ["rotate_fwht"]
        lowered = ir.serde.serialize_model(model)
        onnx.checker.check_model(lowered, full_check=True)
        plain = bool((signs == 1).all())
        assert [n.op_type for n in lowered.graph.node] == [
            f"Hadamard{n}" if plain else f"HadamardTransform{n}"
        ]
        assert len(lowered.graph.node[0].input) == (1 if plain else 2)  # no signs input for the bare H
        x = np.random.default_rng(0).standard_normal((2, 5, n)).astype(np.float32)
        assert rel_max(run(lowered, x), x @ q) < 1e-5


def test_checker_failure_is_a_pass_error():
    model, _ = linear_model(32)
    model.graph.output[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=9))
    with pytest.raises(PassError, match="fails onnx.checker"):
        check_lowered(ir.serde.deserialize_model(model))


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_short_last_group_quantizes_and_lowers_to_matmulnbits(algo):
    """576 input channels in groups of 128 (SmolLM2's hidden size): the last group has 64 channels
    and its own scales; MatMulNBits pads the block, and the ONNX output equals the reference.
    """
    import torch

    from qpass.quant.lorc import layer_error
    from qpass.quant.rtn import rtn

    k = 576
    model, b = linear_model(k)
    x = inputs(k)
    out_model, q = quantize(model, {"weights": {"format": "int4", "group": 128, "algo": algo}}, x)
    assert q.scales.shape[1] == 5  # ceil(576 / 128)
    assert "MatMulNBits" in {n.op_type for n in out_model.graph.node}
    ref = x @ q.dequantized_weight().numpy().T + b
    assert rel_max(run(out_model, x), ref) < 1e-5
    w = torch.from_numpy(onnx.numpy_helper.to_array(model.graph.initializer[0])).T.float()
    if w.shape != q.codes.shape:
        w = torch.from_numpy(onnx.numpy_helper.to_array(model.graph.initializer[1])).T.float()
    tail = rtn(w[:, 512:], "int4").dequantized()  # per-channel over the 64 tail channels alone
    if algo == "rtn":
        torch.testing.assert_close(q.dequantized_weight()[:, 512:], tail)
    else:
        xt = torch.from_numpy(x.reshape(-1, k)).double()
        h = (xt.T @ xt).float()
        assert layer_error(w, q.dequantized_weight(), h) < layer_error(w, rtn(w, q.spec).dequantized(), h)
