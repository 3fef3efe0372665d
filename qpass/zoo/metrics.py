"""How close a quantized model stays to its reference: perplexity for causal LMs, cosine and
nearest-neighbour agreement for sentence embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qpass.errors import ConfigError


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
