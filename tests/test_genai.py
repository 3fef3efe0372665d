"""ONNX Runtime GenAI folders in, GenAI folders out (issue 19, slice 1).

The GenAI builder's own fp32 graphs of tiny random Llama / Qwen2 decoders (GroupQueryAttention
with past/present KV and rotary inside, SimplifiedLayerNormalization and the residual-fused
SkipSimplifiedLayerNormalization): the adapter finds the passes' sites from their structure,
equivalent passes keep prefill and decode logits, and every quantized folder loads in
`og.Model`, generates with `og.Generator`, runs in plain onnxruntime with a hand-fed cache and
stays close to fp32.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from genai_models import tiny_genai_folders

import qpass
from qpass.errors import QPassError
from qpass.zoo.corpora import text_corpus

og = pytest.importorskip("onnxruntime_genai")

PASSES_ONLY = {"weights": None, "activations": None}
CALIB = {"seq_len": 24, "max_rows": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return tiny_genai_folders(("llama", "qwen2"), tmp_path_factory.mktemp("genai"))


@pytest.fixture(scope="module")
def calib_text() -> list[str]:
    return text_corpus("calib")[:60]


@pytest.fixture(scope="module")
def eval_rows(folders) -> list[np.ndarray]:
    """Held-out token rows (eval split), tokenized like GenAI does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folders["llama"] / "tokenizer.json"))
    ids = tok.encode("\n".join(text_corpus("eval")[:20]), add_special_tokens=False).ids
    return [np.array(ids[i * 33 : (i + 1) * 33], dtype=np.int64) for i in range(2)]


# ----------------------------------------------------------------------------- plain onnxruntime
class HandFed:
    """The decoder in plain onnxruntime, its cache fed by hand: prefill on an empty past, then decode."""

    def __init__(self, folder: Path) -> None:
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.cfg = cfg
        self.sess = ort.InferenceSession(str(folder / cfg["filename"]), providers=["CPUExecutionProvider"])
        self.layers = cfg["num_hidden_layers"]

    def _names(self, kind: str) -> list[str]:
        section = "inputs" if kind == "past" else "outputs"
        keys = [f"{kind}_key_names", f"{kind}_value_names"]
        return [self.cfg[section][k] % i for i in range(self.layers) for k in keys]

    def run(self, tokens: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        start = 0 if past is None else past[0].shape[2]
        if past is None:
            shape = (1, self.cfg["num_key_value_heads"], 0, self.cfg["head_size"])
            past = [np.zeros(shape, np.float32) for _ in range(2 * self.layers)]
        feed = {
            "input_ids": tokens.reshape(1, -1),
            "attention_mask": np.ones((1, start + tokens.size), np.int64),
        }
        feed.update(zip(self._names("past"), past, strict=True))
        outs = self.sess.run(["logits", *self._names("present")], feed)
        return outs[0], outs[1:]

    def prefill_decode(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits of a prefill over row[:-1] and of one decode step of row[-1] on its cache."""
        first, cache = self.run(row[:-1], None)
        second, _ = self.run(row[-1:], cache)
        return first, second


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy(folder: Path, prompt: str, new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))[len(ids) :]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


# ----------------------------------------------------------------------------- the builder's graph
def test_builder_graph_has_the_genai_ops(folders):
    for arch, folder in folders.items():
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        ops = Counter(n.op_type for n in proto.graph.node)
        assert ops["GroupQueryAttention"] == 2, arch
        assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 4, arch
        assert ops["MatMul"] == 11, arch  # packed qkv, o, gate, up, down per layer, lm_head
        gqa = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
        assert onnx.helper.get_attribute_value(next(a for a in gqa.attribute if a.name == "do_rotary")) == 1
        names = {i.name for i in proto.graph.input}
        assert {"past_key_values.0.key", "past_key_values.1.value"} <= names, arch
    qwen = onnx.load(str(folders["qwen2"] / "model.onnx"), load_external_data=False)
    assert Counter(n.op_type for n in qwen.graph.node)["Add"] == 2  # the packed q/k/v bias


def test_adapter_reads_the_contrib_ops_from_structure(folders):
    from qpass.api import open_view
    from qpass.graph.refs import OpKind, ValueRef
    from qpass.graph.regions.absorbers import absorbable_sites
    from qpass.graph.regions.streams import components

    view = open_view(str(folders["qwen2"] / "model.onnx"))
    norms = [op for op in view.ops() if op.op_type.endswith("SimplifiedLayerNormalization")]
    assert len(norms) == 5 and all(op.kind is OpKind.RMS_NORM for op in norms)
    for op in norms:  # gamma: input 1 of the plain norm, input 2 (after input and skip) of the fused one
        gamma = view.norm_params(op).gamma
        assert gamma is not None and gamma.name.endswith("layernorm.weight"), (op, gamma)
        assert view.norm_params(op).beta is None
    skip = next(op for op in norms if op.op_type.startswith("Skip"))
    residual = view.node(skip).outputs[3]  # input + skip: not the norm's output
    assert view.producer(ValueRef(residual.name)).kind is OpKind.OTHER
    fused = view.residual_sum(skip)
    assert fused.total == ValueRef(residual.name) and len(fused.inputs) == 2 and fused.bias is None
    assert view.residual_sum(norms[0]) is None  # the plain SimplifiedLayerNormalization adds nothing
    (stream,) = components(view)
    assert len(stream.fused) == 4 and stream.width == 64
    gqa = next(op for op in view.ops() if op.op_type == "GroupQueryAttention")
    assert gqa.kind is OpKind.ATTENTION and view.writes_cache(gqa)
    q, k, v = view.attention_operands(gqa)
    assert q is not None and k is None and v is None  # one packed qkv projection (+ bias)
    usable, rejected = absorbable_sites(view)
    # behind each of the 5 norms: qkv (layer 0 plain norm, layer 1 fused), gate+up, lm_head; and down_proj
    assert len(usable) == 7, [m.label for m in usable]
    assert all("packed" in why for _, why in rejected) and len(rejected) == 2


ROTATE_RESIDUAL = {"passes": [{"fuse_norms": {}}, {"rotate": {"kind": "hadamard", "layout": "residual"}}]}


@pytest.mark.parametrize(
    ("passes", "changed"),
    [
        ({"passes": [{"smooth_quant": {"alpha": 0.5}}]}, "model.layers.0.input_layernorm.weight"),
        (ROTATE_RESIDUAL, "model.embed_tokens.weight"),  # the QuaRot layout through the Skip norms
    ],
    ids=["smooth", "rotate-residual"],
)
def test_equivalent_passes_keep_prefill_and_decode(folders, calib_text, eval_rows, tmp_path, passes, changed):
    """Passes alone, verified by qpass on both programs, and checked here on held-out rows."""
    for arch in ("llama", "qwen2"):
        src, out = folders[arch], tmp_path / arch
        recipe = {**passes, **PASSES_ONLY}
        result = qpass.quantize_with_report(str(src), recipe, calib_text, output_dir=out, **CALIB)
        for res in result.report.results:
            assert res.max_rel_error is not None and res.max_rel_error <= 1e-4, res.name
        last = result.report.results[-1].plan.notes
        assert sum(n.applied for n in last) >= 7, [(n.site, n.detail) for n in last]
        if "rotate" in str(passes):
            stream = next(n for n in last if n.site.startswith("residual stream"))
            assert stream.applied and stream.detail.count("fused norm at") == 4, stream.detail
        ref, new = HandFed(src), HandFed(out)
        for row in eval_rows:
            for a, b in zip(new.prefill_decode(row), ref.prefill_decode(row), strict=True):
                assert rel_err(a, b) <= 1e-4, arch
        w_ref = {t.name: t for t in onnx.load(str(src / "model.onnx")).graph.initializer}
        w_new = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
        delta = onnx.numpy_helper.to_array(w_new[changed]) - onnx.numpy_helper.to_array(w_ref[changed])
        assert np.abs(delta).max() > 1e-3  # the constant really took the transform
        assert greedy(out, "The quick brown fox", 8) == greedy(src, "The quick brown fox", 8), arch


# ----------------------------------------------------------------------------- quantized folders
# (recipe, arch, the op each of the 11 linears became, plain MatMuls left, bound on
# max |logit error| / max |logit| over held-out prefill and decode logits).
# Measured (seq_len 24 x 3 calibration rows, 2 held-out rows of 32 + 1 tokens):
# 0.037, 0.42, 0.38, 0.38, 0.034; a broken cache or mis-fed decode step gives errors of order 1.
# Static QDQ keeps its 11 MatMuls between Q/DQ; w4a8-rotate's 4 are its online Hadamards before
# down_proj and o_proj (V is packed with q/k, so it cannot take o_proj's rotation offline).
QUANTIZED = [
    ("w8a8-dynamic", "llama", "MatMulIntegerToFloat", 0, 0.08),
    ("w4a16-gptq", "llama", "MatMulNBits", 0, 0.6),
    ("w8a8-smooth", "llama", "MatMul", 11, 0.6),
    ("w4a8-rotate", "llama", "MatMulIntegerToFloat", 4, 0.6),
    ("w8a8-smooth-dynamic", "qwen2", "MatMulIntegerToFloat", 0, 0.08),
]


@pytest.mark.parametrize(("recipe", "arch", "qop", "matmuls", "bound"), QUANTIZED)
def test_quantized_folder_generates_and_stays_close(
    folders, calib_text, eval_rows, tmp_path, recipe, arch, qop, matmuls, bound
):
    src, out = folders[arch], tmp_path / "q"
    before = digest(src)
    result = qpass.quantize_with_report(str(src), recipe, calib_text, output_dir=out, **CALIB)
    assert result.model == out and digest(src) == before  # the input folder is never modified
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "genai_config.json").read_text()) == json.loads(
        (src / "genai_config.json").read_text()
    )
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    assert ops["MatMul"] == matmuls and ops[qop] == 11
    if qop == "MatMul":  # static QDQ: weights and activations both pass Q/DQ pairs
        assert ops["DequantizeLinear"] >= 20
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4

    tokens = greedy(out, "The quick brown fox", 8)
    assert len(tokens) == 8 and all(0 <= t < 512 for t in tokens)

    ref, new = HandFed(src), HandFed(out)
    errs = [
        rel_err(a, b)
        for row in eval_rows
        for a, b in zip(new.prefill_decode(row), ref.prefill_decode(row), strict=True)
    ]
    assert 0 < max(errs) <= bound, errs


def test_cli_quantizes_a_genai_folder(folders, calib_text, tmp_path):
    src, out = folders["llama"], tmp_path / "cli_out"
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(calib_text))
    before = digest(src)
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "qpass",
        "quantize",
        str(src),
        "-o",
        str(out),
        "--recipe",
        "w8a8-dynamic",
    ]
    done = subprocess.run(
        [*cmd, "--calib", str(calib), "--max-len", "16"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert digest(src) == before and (out / "genai_config.json").is_file()
    assert len(greedy(out, "import os", 4)) == 4


def test_bad_genai_folders_give_one_line_errors(folders, calib_text, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QPassError, match=r"genai_config\.json") as exc:
        qpass.quantize(str(empty), "w8a8-dynamic", calib_text, output_dir=tmp_path / "o1")
    assert "\n" not in str(exc.value)
    broken = tmp_path / "broken"
    shutil.copytree(folders["llama"], broken)
    (broken / "model.onnx.data").unlink()
    with pytest.raises(QPassError, match=r"model\.onnx\.data") as exc:
        qpass.quantize(str(broken), "w8a8-dynamic", calib_text, output_dir=tmp_path / "o2")
    assert "\n" not in str(exc.value)
    (broken / "model.onnx").unlink()
    with pytest.raises(QPassError, match=r"broken/model\.onnx: the decoder") as exc:
        qpass.quantize(str(broken), "w8a8-dynamic", calib_text, output_dir=tmp_path / "o3")
    with pytest.raises(QPassError, match="output_dir"):
        qpass.quantize(str(folders["llama"]), "w8a8-dynamic", calib_text)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_feeds_are_prefill_then_decode_on_its_cache(folders, calib_text):
    from qpass.genai_feeds import DecoderFeeds, GenAICalibration, text_rows
    from qpass.genai_folder import load_genai_folder

    folder = load_genai_folder(folders["qwen2"])
    rows = text_rows(folder, "\n".join(calib_text), GenAICalibration(seq_len=10, max_rows=2))
    assert [r.size for r in rows] == [11, 11]  # full rows, no padding
    feeds = DecoderFeeds(folder).feeds(rows).items
    assert len(feeds) == 4
    prefill, decode = feeds[0], feeds[1]
    assert prefill["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert decode["past_key_values.1.value"].shape == (1, 2, 10, 16)
    assert decode["attention_mask"].shape == (1, 11) and decode["input_ids"].tolist() == [[rows[0][-1]]]
    ref = HandFed(folders["qwen2"])
    _, cache = ref.run(rows[0][:-1], None)
    np.testing.assert_array_equal(decode["past_key_values.1.value"], cache[3])


def test_config_follows_the_decoder_interface(folders):
    from qpass.errors import ModelLoadError
    from qpass.genai_folder import load_genai_folder, updated_config

    folder = load_genai_folder(folders["llama"])
    cache_in, cache_out = folder.cache.past_names(), folder.cache.present_names()
    same = updated_config(folder, ["input_ids", "attention_mask", *cache_in], ["logits", *cache_out])
    assert same == folder.config
    no_mask = updated_config(folder, ["input_ids", *cache_in], ["logits", *cache_out])
    assert "attention_mask" not in no_mask["model"]["decoder"]["inputs"]
    with pytest.raises(ModelLoadError, match="position_ids"):
        updated_config(
            folder, ["input_ids", "attention_mask", "position_ids", *cache_in], ["logits", *cache_out]
        )
    with pytest.raises(ModelLoadError, match="present"):
        updated_config(folder, ["input_ids", "attention_mask", *cache_in], ["logits", *cache_out[:-1]])
