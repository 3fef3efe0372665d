"""Every built-in recipe lowers the real MiniLM to ONNX, runs in stock onnxruntime (CPU provider,
no custom op library) and matches the torch-side quantized model of the same recipe.

CI runs a representative subset, one recipe per lowered form (static QDQ, per-token
MatMulIntegerToFloat, MatMulNBits, Hadamard function ops + MatMulIntegerToFloat, MXFP4 function
ops): GPTQ, alpha-searching smoothing and DuQuant make the other recipes minutes each on 2 cores.
`QPASS_ALL_RECIPES=1` runs every built-in recipe.

"Within quantization noise": the ONNX and torch quantized embeddings differ from each other by
less than the torch one differs from FP32 (the two graphs are exported separately, so rounding
ties can flip differently; they are not expected to agree bit for bit), and the ONNX model is no
further from FP32 than the torch one, up to 25%.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qpass
from qpass import zoo
from qpass.recipe import builtin_names, get_recipe

pytestmark = [pytest.mark.slow]

# every built-in recipe lowers to ONNX; those whose `target` is torch run here with it overridden
# (a recipe with a `kv_cache:` section is for transformers causal LMs, tested in test_causal_lm.py)
ONNX_RECIPES = [n for n in builtin_names() if get_recipe(n).kv_cache is None]
LOWERED_OP = {  # the op that shows the recipe took its intended form
    "w8a8": "QuantizeLinear",
    "w8a8-smooth": "QuantizeLinear",
    "w8a8-os+": "QuantizeLinear",
    "w8a8-outliertune": "QuantizeLinear",
    "w8a8-dynamic": "MatMulIntegerToFloat",
    "w8a8-smooth-dynamic": "MatMulIntegerToFloat",
    "w4a16": "MatMulNBits",
    "w4a16-gptq": "MatMulNBits",
    "w4a8-rotate": "HadamardTransform1536",
    "w4a4-rotate": "HadamardTransform1536",
    "w4a8-rotate-g128": "HadamardTransform1536",  # + MatMulNBits blocks of 128 behind the rotation
    "w4a16-rotate-gptq": "MatMulNBits",
    "w4a4-duquant": "MatMulIntegerToFloat",
    "w8a8-int8decomp": "MatMulIntegerToFloat",
    "w4a16-awq": "MatMulNBits",
    "w3a16-gptq-lorc": "MatMulNBits",  # + the LoRC MatMul pair
    "mixed-4.5bit": "MatMulNBits",
    "int4-splitquant": "MatMulNBits",  # one linear over the concatenated parts
    "mxfp4-reorder": "DequantizeMXFP4",  # qpass function ops (lowering/onnx_block_formats.py)
    "w4a16-adadim": "DequantizeLinear",  # row groups: blocked (opset 21) or per-axis + Reshape
    "w8a8-disassemble": "QuantizeLinear",  # MiniLM has no exact disassembly site: plain W8A8
    "w8a8-cle": "QuantizeLinear",  # MiniLM has no Conv -> ReLU -> Conv chain: plain static W8A8
}
SUBSET = ("w8a8", "w8a8-dynamic", "w4a16", "w4a8-rotate", "mxfp4-reorder")
ALL = os.environ.get("QPASS_ALL_RECIPES") == "1"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    embedder, tok = zoo.load_minilm_embedder()
    path = zoo.export_minilm_onnx(tmp_path_factory.mktemp("minilm") / "minilm.onnx", embedder=embedder)
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=16, max_len=64)
    held = zoo.minilm_batches(tok, zoo.sentences("eval", 32), batch_size=16, max_len=64)
    fp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([fp.run(["embedding"], b)[0] for b in held])
    return embedder, str(path), calib, held, ref


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _torch_batch(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in b.items()}


def test_every_onnxruntime_recipe_has_a_lowered_form():
    assert set(ONNX_RECIPES) == set(LOWERED_OP)


@pytest.mark.parametrize("recipe", ONNX_RECIPES)
def test_recipe_lowers_minilm_and_matches_torch(minilm, recipe):
    if recipe not in SUBSET and not ALL:
        pytest.skip("minutes on 2 cores; QPASS_ALL_RECIPES=1 runs it")
    embedder, path, calib, held, ref = minilm
    as_onnx = {**get_recipe(recipe).to_dict(), "target": "onnxruntime"}
    q = qpass.quantize(path, as_onnx, calib, verify=False)
    onnx.checker.check_model(q, full_check=True)
    ops = collections.Counter(n.op_type for n in q.graph.node)
    qpass_ops = sum(1 for n in q.graph.node if n.domain == "qpass")
    quant_ops = ("MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear")
    assert sum(ops[o] for o in quant_ops) + qpass_ops > 0, ops
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    emb = np.concatenate([sess.run(["embedding"], b)[0] for b in held])
    assert np.isfinite(emb).all()
    err_onnx = _rel(emb, ref)
    assert 0 < err_onnx < 1.0
    assert ops[LOWERED_OP[recipe]] > 0, ops
    qt = qpass.quantize(embedder, recipe, [_torch_batch(b) for b in calib], verify=False)
    with torch.no_grad():
        emb_t = np.concatenate([qt(**_torch_batch(b)).numpy() for b in held])
    err_torch = _rel(emb_t, ref)
    assert _rel(emb, emb_t) < err_torch, (recipe, _rel(emb, emb_t), err_torch)
    assert err_onnx <= 1.25 * err_torch, (recipe, err_onnx, err_torch)
