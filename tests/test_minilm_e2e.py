"""End to end on the real MiniLM: ONNX export, the real `qpass quantize` CLI, stock ONNX Runtime."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qpass import zoo
from qpass.qconfig import ActGranularity
from qpass.recipe import get_recipe

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
]

RECIPE = "w8a8-smooth"
N_CALIB, N_EVAL = 64, 128


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _embed(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["embedding"], b)[0] for b in batches])


def test_cli_w8a8_smooth_on_minilm_keeps_embeddings(tmp_path):
    recipe = get_recipe(RECIPE)
    assert recipe.activations is not None
    assert recipe.activations.granularity is ActGranularity.PER_TENSOR and not recipe.activations.dynamic

    embedder, tok = zoo.load_minilm_embedder()
    src = Path(zoo.export_minilm_onnx(tmp_path / "minilm.onnx", embedder=embedder, tokenizer=tok))
    # one padded array per input; qpass skips the padded positions (attention_mask) when calibrating
    sents = zoo.sentences("calib", N_CALIB)
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="np")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    dst = tmp_path / "minilm.q.onnx"
    digest = _sha256(src)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-P", "-m", "qpass", "quantize", str(src), "-o", str(dst)]
    cmd += ["--recipe", RECIPE, "--calib", str(calib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, f"qpass quantize failed:\n{proc.stdout}\n{proc.stderr}"
    assert "smooth_quant" in proc.stderr and "quantize" in proc.stderr  # progress messages go to stderr

    assert _sha256(src) == digest, "the input model was modified"
    onnx.checker.check_model(str(dst))
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert dst.stat().st_size < 0.75 * src.stat().st_size  # INT8 linear weights

    batches = zoo.minilm_batches(tok, zoo.sentences("eval", N_EVAL), batch_size=32)
    agree = zoo.embedding_agreement(_embed(src, batches), _embed(dst, batches))
    assert agree["mean_cosine"] >= 0.98, agree
    assert agree["min_cosine"] >= 0.9, agree
