"""Argument checks and thread control shared by the rotation maths (`qpass.math`)."""

from __future__ import annotations

import contextlib

import torch

from qpass.errors import ConfigError
from qpass.threads import single_thread


def check_order(n: object, what: str = "n") -> int:
    """``n`` as a positive int (a matrix order or block size); ConfigError otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        msg = f"{what} must be a positive int, got {n!r}"
        raise ConfigError(msg)
    return n


def check_float_dtype(dtype: torch.dtype) -> None:
    """ConfigError unless ``dtype`` is a floating dtype."""
    if not dtype.is_floating_point:
        msg = f"dtype must be a floating dtype, got {dtype}"
        raise ConfigError(msg)


def small_op_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """One intra-op thread for small LAPACK calls (n <= 512) and loops of small ops."""
    return single_thread(n <= 512)
