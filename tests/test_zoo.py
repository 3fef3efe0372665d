"""qpass.zoo: offline text splits, token packing, metrics, and the real models (marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpass import zoo
from qpass.errors import ConfigError

# ----------------------------------------------------------------------------- text


def test_corpus_splits_disjoint_and_nonempty():
    calib, ev = zoo.text_corpus("calib"), zoo.text_corpus("eval")
    assert len(calib) > 300 and len(ev) > 100
    assert not set(calib) & set(ev)
    assert all(len(p) >= 40 and "  " not in p and "\n" not in p for p in calib + ev)
    assert zoo.text_corpus("eval") == ev  # deterministic


def test_out_of_domain_text_is_prose_of_its_own():
    ood = zoo.text_corpus("ood")
    assert len(ood) >= 30 and sum(map(len, ood)) > 10_000  # enough for 8 rows of 256 tokens
    assert not set(ood) & (set(zoo.text_corpus("calib")) | set(zoo.text_corpus("eval")))
    assert any("Python Software Foundation" in p for p in ood)


def test_sentences_disjoint_natural_and_bounded():
    calib, ev = zoo.sentences("calib"), zoo.sentences("eval")
    assert len(calib) >= 256 and len(ev) >= 128
    assert not set(calib) & set(ev)
    assert all(">>>" not in s and "::=" not in s and s[-1] in ".!?" for s in calib + ev)
    assert zoo.sentences("calib", 5) == calib[:5]
    with pytest.raises(ConfigError, match="holds"):
        zoo.sentences("eval", 10**6)


def test_bad_split_is_config_error():
    with pytest.raises(ConfigError, match="split"):
        zoo.text_corpus("train")


class _CharTokenizer:
    """Tiny stand-in tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 250 for c in t] for t in texts]}


def test_packed_rows_full_no_padding():
    tok = _CharTokenizer()
    rows = zoo.packed_token_rows(tok, "eval", 128, 10)
    assert rows.shape == (10, 128) and rows.dtype == torch.long
    flat = rows.flatten().tolist()
    first = zoo.text_corpus("eval")[0]
    assert flat[: len(first)] == tok([first])["input_ids"][0] and flat[len(first)] == 0
    every = zoo.packed_token_rows(tok, "eval", 128)
    assert torch.equal(every[:10], rows)
    with pytest.raises(ConfigError, match="full rows"):
        zoo.packed_token_rows(tok, "eval", 128, every.shape[0] + 1)


# ----------------------------------------------------------------------------- metrics


def test_perplexity_of_uniform_and_perfect_models():
    vocab = 7
    rows = torch.randint(0, vocab, (5, 9), generator=torch.Generator().manual_seed(0))

    def uniform(x):
        return torch.zeros(*x.shape, vocab)

    assert zoo.perplexity(uniform, rows, batch_size=2) == pytest.approx(vocab, rel=1e-6)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def oracle(x):  # puts all mass on the true next token
        logits = torch.full((*x.shape, vocab), -1e4)
        logits[:, :-1].scatter_(-1, x[:, 1:, None], 0.0)
        return Out(logits)

    assert zoo.perplexity(oracle, rows) == pytest.approx(1.0, abs=1e-6)


def test_embedding_agreement():
    rng = np.random.default_rng(0)
    fp = rng.standard_normal((16, 8))
    same = zoo.embedding_agreement(fp, 3.0 * fp)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["min_cosine"] == pytest.approx(1.0)
    assert same["nn_agreement"] == 1.0
    noisy = zoo.embedding_agreement(fp, fp + rng.standard_normal(fp.shape))
    assert noisy["min_cosine"] < noisy["mean_cosine"] < 1.0 and 0.0 <= noisy["nn_agreement"] <= 1.0
    with pytest.raises(ConfigError):
        zoo.embedding_agreement(fp, fp[:3])


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_minilm_embedder_and_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    emb, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("eval", 6), batch_size=4, max_len=64)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert all(b[k].dtype == np.int64 for b in batches for k in ("input_ids", "attention_mask"))

    path = zoo.export_minilm_onnx(tmp_path / "minilm.onnx", embedder=emb, tokenizer=tok)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "LayerNormalization"} <= ops
    assert sum(i.name.endswith(".weight_t") for i in model.graph.initializer) == 36
    assert list(tmp_path.iterdir()) == [tmp_path / "minilm.onnx"]  # no temp file left

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b in batches:  # two different (batch, seq) shapes through the dynamic axes
        (got,) = sess.run(["embedding"], b)
        with torch.no_grad():
            want = emb(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])).numpy()
        assert got.shape == (b["input_ids"].shape[0], 384)
        np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
        assert zoo.embedding_agreement(want, got)["min_cosine"] > 0.99999


@pytest.mark.slow
def test_smollm2_loads_and_predicts_text():
    model, tok = zoo.load_smollm2()
    again, _ = zoo.load_smollm2()
    assert again is not model and again.lm_head.weight is again.model.embed_tokens.weight
    assert model.config.use_cache is False and not model.training
    rows = zoo.packed_token_rows(tok, "eval", 64, 2)
    assert rows.shape == (2, 64) and int(rows.max()) < model.config.vocab_size
    ppl = zoo.perplexity(model, rows)
    assert 1.0 < ppl < 500.0  # ~113 on these 2x64 tokens; random logits would give ~49152
