"""Feeds for a GenAI decoder: the two programs it runs, prefill and decode, built from token rows.

ONNX Runtime GenAI runs one graph two ways: a prefill over the prompt with an empty cache (past
length 0), then decode steps of one token that read the previous step's `present.*` as their
past. qpass calibrates and verifies on both, so every token row gives two explicit feeds: the
row's first n-1 tokens with an empty past, and its last token with the cache that prefill wrote
(run here through the unmodified decoder). A pass that breaks either program fails verification.

Text becomes rows through the folder's own `tokenizer.json` (the file GenAI tokenizes with):
every line joined into one token stream, cut into full rows of `seq_len + 1` tokens with no
padding (a padded row would skew static ranges and say nothing about the cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qpass.data import Feeds
from qpass.errors import CalibrationError
from qpass.genai_folder import GenAIFolder
from qpass.threads import ort_session_options

_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
}
_DTYPES[onnx.TensorProto.INT32] = np.int32


@dataclass(frozen=True)
class GenAICalibration:
    """How text becomes calibration rows: `seq_len` prefill tokens (+1 decoded) per row, at most
    `max_rows` rows (the rest of the text is not used).
    """

    seq_len: int = 128
    max_rows: int = 16

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.max_rows < 1:
            msg = f"GenAI calibration needs seq_len >= 1 and max_rows >= 1 (got {self.seq_len}, {self.max_rows})"
            raise CalibrationError(msg)


def read_text(source: str | os.PathLike | Sequence[str]) -> str:
    """A text file's contents, or a list of strings joined by newlines."""
    if isinstance(source, (str, os.PathLike)):  # a path; text itself comes as a list of strings
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"{str(path)[:200]}: not a readable calibration text file ({type(exc).__name__})"
            raise CalibrationError(msg) from exc
    return "\n".join(source)


def text_rows(folder: GenAIFolder, text: str, calib: GenAICalibration) -> list[np.ndarray]:
    """Full, unpadded token rows of `seq_len + 1` tokens cut from `text` (tokenized by the folder)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        msg = "text calibration of a GenAI folder needs the 'tokenizers' package (pip install tokenizers)"
        raise CalibrationError(msg) from exc
    if not folder.tokenizer_file.is_file():
        msg = f"{folder.tokenizer_file}: not found; text calibration tokenizes with the folder's tokenizer"
        raise CalibrationError(msg)
    tokenizer = Tokenizer.from_file(str(folder.tokenizer_file))
    lines = [line for line in text.splitlines() if line.strip()]
    ids = np.array(tokenizer.encode("\n".join(lines), add_special_tokens=False).ids, dtype=np.int64)
    width = calib.seq_len + 1
    count = min(len(ids) // width, calib.max_rows)
    if count == 0:
        msg = f"calibration text gives {len(ids)} tokens, fewer than one row of {width} (seq_len + 1)"
        raise CalibrationError(msg)
    return [ids[i * width : (i + 1) * width] for i in range(count)]


class DecoderFeeds:
    """Builds prefill/decode feeds for one GenAI decoder (its graph inputs read from the file)."""

    def __init__(self, folder: GenAIFolder) -> None:
        self.folder = folder
        proto = onnx.load(str(folder.decoder), load_external_data=False)
        self.inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
        self.outputs = [o.name for o in proto.graph.output]
        roles = folder.input_names
        self.ids_name = roles.get("input_ids", "input_ids")
        self.mask_name = roles.get("attention_mask")
        self.pos_name = roles.get("position_ids")
        known = {self.ids_name, self.mask_name, self.pos_name, *folder.cache.past_names()}
        unknown = [n for n in self.inputs if n not in known]
        if unknown:
            msg = f"{folder.decoder}: input '{unknown[0]}' is not one genai_config.json names; qpass cannot feed it"
            raise CalibrationError(msg)
        missing = [n for n in folder.cache.present_names() if n not in self.outputs]
        if missing:
            msg = f"{folder.decoder}: no output '{missing[0]}' (genai_config.json's present cache names)"
            raise CalibrationError(msg)
        self._session: Any = None

    def _dtype(self, name: str) -> Any:
        elem = self.inputs[name].elem_type
        if elem not in _DTYPES:
            msg = f"{self.folder.decoder}: input '{name}' has element type {onnx.TensorProto.DataType.Name(elem)}"
            raise CalibrationError(msg)
        return _DTYPES[elem]

    def _cache_shape(self, name: str, length: int) -> tuple[int, ...]:
        """[batch, kv_heads, length, head_size]: the file's static dims where it has them."""
        dims = self.inputs[name].shape.dim
        layout = (1, self.folder.cache.kv_heads, length, self.folder.cache.head_size)
        if len(dims) != 4:
            msg = f"{self.folder.decoder}: cache input '{name}' has rank {len(dims)}, expected 4 (BNSH)"
            raise CalibrationError(msg)
        return tuple(
            d.dim_value if d.HasField("dim_value") and i != 2 else layout[i] for i, d in enumerate(dims)
        )

    def step(self, tokens: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One program's feed: `tokens` [n] after a cache of `past` (None: an empty cache, length 0)."""
        cache = self.folder.cache
        start = 0 if past is None else next(iter(past.values())).shape[2]
        feed = {self.ids_name: tokens.reshape(1, -1).astype(self._dtype(self.ids_name))}
        total = start + tokens.size
        if self.mask_name in self.inputs:
            feed[self.mask_name] = np.ones((1, total), dtype=self._dtype(self.mask_name))
        if self.pos_name in self.inputs:
            feed[self.pos_name] = np.arange(start, total, dtype=self._dtype(self.pos_name)).reshape(1, -1)
        for name in cache.past_names():
            if past is None:
                feed[name] = np.zeros(self._cache_shape(name, 0), dtype=self._dtype(name))
            else:
                feed[name] = past[name]
        return feed

    def present(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `feed` through the source decoder; its present cache keyed by the next step's past names."""
        import onnxruntime as ort

        if self._session is None:
            opts = ort_session_options(log_severity_level=3)
            self._session = ort.InferenceSession(
                str(self.folder.decoder), opts, providers=["CPUExecutionProvider"]
            )
        cache = self.folder.cache
        outs = self._session.run(cache.present_names(), feed)
        return dict(zip(cache.past_names(), outs, strict=True))

    def feeds(self, rows: Sequence[np.ndarray]) -> Feeds:
        """Prefill (empty past) and decode (prefill's present) feeds for every row of >= 2 tokens."""
        items, origins = [], []
        for i, row in enumerate(rows):
            row = np.asarray(row).reshape(-1)
            if row.size < 2:
                msg = f"token row {i} has {row.size} tokens; a prefill and a decode step need at least 2"
                raise CalibrationError(msg)
            prefill = self.step(row[:-1], None)
            items += [prefill, self.step(row[-1:], self.present(prefill))]
            origins += [f"row {i} prefill ({row.size - 1} tokens)", f"row {i} decode (past {row.size - 1})"]
        return Feeds(items, origins)


def calibration_feeds(folder: GenAIFolder, calibration: Any, calib: GenAICalibration) -> Feeds:
    """Explicit feeds from text (a .txt path or a list of strings), token rows, or `Feeds` as given."""
    if isinstance(calibration, Feeds):
        return calibration
    if isinstance(calibration, (str, os.PathLike)) or (
        isinstance(calibration, Sequence) and calibration and all(isinstance(s, str) for s in calibration)
    ):
        rows = text_rows(folder, read_text(calibration), calib)
    else:
        rows = [np.asarray(r, dtype=np.int64) for r in calibration]
    if not rows:
        msg = "GenAI calibration: no token rows"
        raise CalibrationError(msg)
    return DecoderFeeds(folder).feeds(rows)
