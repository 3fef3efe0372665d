"""Real English text from the standard library (``pydoc_data.topics``), split into disjoint
calibration and evaluation parts, as paragraphs, natural sentences or packed token rows; and an
out-of-domain evaluation text (``"ood"``: the Python distribution's own LICENSE.txt, legal and
historical prose that shares no paragraph with the reference topics).
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Any

import torch

from qpass.errors import ConfigError

SPLITS = ("calib", "eval", "ood")

_MIN_PARAGRAPH_CHARS = 40
_EVAL_EVERY = 4  # about one paragraph in four is held out for evaluation


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


def _license_paragraphs() -> tuple[str, ...]:
    import sysconfig
    from pathlib import Path

    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        msg = f"{path}: this Python ships no LICENSE.txt for the 'ood' text split"
        raise ConfigError(msg)
    return tuple(dict.fromkeys(_prose_paragraphs(path.read_text(encoding="utf-8"))))


@functools.cache
def _corpus(split: str) -> tuple[str, ...]:
    if split == "ood":
        return _license_paragraphs()
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
    key, then position in the topic. ``"ood"`` is another domain for evaluation
    only: the paragraphs of the interpreter's LICENSE.txt (about 3,000 tokens).
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
