"""Every `qpass` subcommand in a subprocess on the real MiniLM ONNX model (one export, shared).

The outlier report must show MiniLM's known outlier channel (99, in the input of every FFN
up-projection) and, after `w8a8-smooth`, flatter activations at the sites smoothing reaches (the
attention output projections; in this post-LN BERT the LayerNorm outputs also feed the residual,
so smoothing skips them).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from test_cli_tools import check_html, layer_numbers, pearson_kurtosis, qpass_cli

from qpass import zoo
from qpass.api import open_view
from qpass.data import onnx_batches
from qpass.pass_base import PassContext
from qpass.pass_manager import run_passes
from qpass.recipe import get_recipe
from qpass.sources import load_data

pytestmark = pytest.mark.slow

N_CALIB = 16


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """`qpass zoo minilm` writes the model and the text; the .npz is the same text tokenized here."""
    folder = tmp_path_factory.mktemp("cli_minilm")
    proc = qpass_cli("zoo", "minilm", str(folder), "--samples", str(N_CALIB))
    assert proc.returncode == 0, proc.stderr
    model, text = folder / "minilm.onnx", folder / "calib.txt"
    sentences = text.read_text().splitlines()
    assert sentences == zoo.sentences("calib", N_CALIB)
    assert (folder / "eval.txt").read_text().splitlines() == zoo.sentences("eval", N_CALIB)
    enc = zoo.load_minilm_tokenizer()(
        sentences, padding=True, truncation=True, max_length=48, return_tensors="np"
    )
    npz = folder / "calib.npz"
    np.savez(npz, **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return model, text, npz, folder


@pytest.fixture(scope="module")
def quantized(minilm):
    model, text, _, folder = minilm
    out = folder / "minilm.q.onnx"
    proc = qpass_cli(
        "quantize", str(model), "-o", str(out), "--recipe", "w8a8-smooth", "--calib", str(text),
        "--tokenizer", "minilm", "--max-len", "48",
    )  # fmt: skip
    return proc, out


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_quantize_from_text_with_the_tokenizer(minilm, quantized):
    proc, out = quantized
    assert proc.returncode == 0, proc.stderr
    assert f"calibrating on {N_CALIB} samples from" in proc.stderr
    assert "smooth_quant: 6 sites" in proc.stderr and "verified: max rel err" in proc.stderr
    tok = zoo.load_minilm_tokenizer()
    (batch,) = zoo.minilm_batches(tok, zoo.sentences("eval", 16), batch_size=16, max_len=48)
    a, b = _session(minilm[0]).run(None, batch)[0], _session(out).run(None, batch)[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.97


def test_text_data_is_padded_per_batch_with_a_mask(minilm):
    _, text, _, _ = minilm
    chunks = load_data(text, tokenizer="minilm", batch_size=8, max_len=48)
    tok = zoo.load_minilm_tokenizer()
    assert [len(c["input_ids"]) for c in chunks] == [8, 8]
    for c in chunks:
        ids, mask = c["input_ids"], c["attention_mask"]
        assert mask.min() == 0 and mask[:, 0].all()  # some rows padded, each has tokens
        assert (ids[mask == 0] == tok.pad_token_id).all() and (ids[mask == 1] != tok.pad_token_id).all()


def test_inspect_shows_minilm_outliers_and_their_reduction(minilm):
    model, _, npz, folder = minilm
    out = folder / "report"
    proc = qpass_cli(
        "inspect", str(model), "--calib", str(npz), "--recipe", "w8a8-smooth", "--report", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    check_html(out)
    doc = json.loads((out / "report.json").read_text())

    # the JSON numbers are the library's
    view = open_view(str(model))
    batches = onnx_batches(view.model, str(npz), 8)
    before = layer_numbers(view, batches)
    recipe = get_recipe("w8a8-smooth")
    run_passes(
        view, [s.build() for s in recipe.passes], batches, PassContext(recipe.weights, recipe.activations)
    )
    after = layer_numbers(view, batches)
    assert [layer["op"] for layer in doc["layers"]] == list(before) and len(before) == 36
    for layer in doc["layers"]:
        for when, numbers in (("before", before), ("after", after)):
            for kind in ("act", "weight"):
                want = numbers[layer["op"]][kind]
                np.testing.assert_allclose(layer[when][kind]["absmax"], want, rtol=1e-5)
                assert layer[when][kind]["kurtosis"] == pytest.approx(pearson_kurtosis(want), rel=1e-5)

    # channel 99 is an outlier at the input of every FFN up-projection
    ffn_in = [layer for layer in doc["layers"] if layer["label"].endswith("intermediate.dense")]
    assert len(ffn_in) == 6
    for layer in ffn_in:
        assert 99 in [o["channel"] for o in layer["before"]["act"]["outliers"]]
        assert layer["before"]["act"]["max_ratio"] > 8
    shared = {s["channel"]: s for s in doc["shared_outliers"]["before"]}
    assert len(shared[99]["layers"]) >= 6

    # smoothing reaches the attention output projections, and flattens their activations there
    smoothed = [
        layer
        for layer in doc["layers"]
        if not np.allclose(layer["before"]["act"]["absmax"], layer["after"]["act"]["absmax"], rtol=1e-5)
    ]
    assert {layer["label"].rsplit(".", 3)[-3:] == ["attention", "output", "dense"] for layer in smoothed} == {
        True
    }
    assert len(smoothed) == 6
    for layer in smoothed:
        b, a = layer["before"]["act"], layer["after"]["act"]
        assert a["max_ratio"] < 0.85 * b["max_ratio"] and a["kurtosis"] < b["kurtosis"]
    assert "smooth_quant: 6 sites" in doc["passes"][0]


def test_eval_json_matches_onnxruntime(minilm, quantized):
    model, _, npz, _ = minilm
    _, q = quantized
    proc = qpass_cli("eval", str(model), str(q), "--data", str(npz), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (o,) = doc["outputs"]
    assert o["name"] == "embedding" and doc["samples"] == N_CALIB
    with np.load(npz) as z:
        feeds = {k: z[k] for k in z.files}
    a = np.concatenate(
        [_session(model).run(None, {k: v[i : i + 8] for k, v in feeds.items()})[0] for i in (0, 8)]
    )
    b = np.concatenate(
        [_session(q).run(None, {k: v[i : i + 8] for k, v in feeds.items()})[0] for i in (0, 8)]
    )
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert o["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-6)
    assert o["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
    assert o["rel_error"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-5)
    human = qpass_cli("eval", str(model), str(q), "--data", str(npz), "--quiet")
    assert human.returncode == 0 and "embedding" in human.stdout and f"{o['cosine_mean']:.5f}" in human.stdout
