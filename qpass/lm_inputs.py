"""Calibration for causal LMs as int64 `input_ids` batches without padding: tensors, dicts, or text
packed end to end into full rows with the model's tokenizer (padded rows wreck static ranges).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qpass.errors import CalibrationError


def token_rows(
    calibration: Any, tokenizer: Any = None, seq_len: int = 256, max_rows: int = 128, batch_rows: int = 8
) -> list[torch.Tensor]:
    """Calibration as int64 `input_ids` batches [B, T] with no padding.

    Accepts input_ids tensors, dicts holding `input_ids` (an `attention_mask` must be all ones:
    padded rows wreck static ranges), or text (a string or strings) with `tokenizer`, packed
    end to end into full rows of `seq_len` tokens (at most `max_rows`, in batches of `batch_rows`).
    """
    if isinstance(calibration, (str, Path)) or (
        isinstance(calibration, Sequence) and calibration and all(isinstance(c, str) for c in calibration)
    ):
        texts = [str(calibration)] if isinstance(calibration, (str, Path)) else list(calibration)
        rows = _pack(tokenizer, texts, seq_len)[:max_rows]
        return list(rows.split(batch_rows))
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or not calibration:
        msg = "calibration: expected input_ids tensors, dicts with 'input_ids', or text with tokenizer="
        raise CalibrationError(msg)
    rows = []
    for i, item in enumerate(calibration):
        if isinstance(item, (tuple, list)) and len(item) == 1:
            item = item[0]
        if isinstance(item, Mapping):
            mask = item.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).all()):
                msg = (
                    f"calibration batch {i}: 'attention_mask' has padding; pack text into full rows "
                    "(pass text with tokenizer=) so padded positions do not enter the ranges"
                )
                raise CalibrationError(msg)
            if "input_ids" not in item:
                msg = f"calibration batch {i}: no 'input_ids' key (keys: {sorted(item)})"
                raise CalibrationError(msg)
            item = item["input_ids"]
        ids = torch.as_tensor(item)
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
            msg = f"calibration batch {i}: expected integer input_ids [B, T], got {ids.dtype} {tuple(ids.shape)}"
            raise CalibrationError(msg)
        rows.append(ids.reshape(1, -1).long() if ids.dim() == 1 else ids.long())
    return rows


def _pack(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    if tokenizer is None:
        msg = "calibration: text needs the model's tokenizer (tokenizer=...)"
        raise CalibrationError(msg)
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    for t in texts:
        ids += list(tokenizer(t, add_special_tokens=False)["input_ids"]) + sep
    n = len(ids) // seq_len
    if n == 0:
        msg = f"calibration: the text holds {len(ids)} tokens, fewer than one row of {seq_len}"
        raise CalibrationError(msg)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)
