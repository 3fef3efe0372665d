"""Which lowered form a quantized linear takes, decided once for both lowerings.

A `QLinear` carries optional parts (codes, corrections, float channels, block-format spec). The
torch and ONNX lowerings used to test them in opposite orders, so a combination one of them never
expected could lower differently on the two graph kinds. `linear_form` is the one classification
both call; a combination no lowering implements is an error here, not a silent choice there.
"""

from __future__ import annotations

from enum import Enum

from qpass.errors import UnsupportedOpError
from qpass.quant.qlinear import QLinear


class LinearForm(Enum):
    """The lowered shape of one linear (its kernel is chosen later, per graph kind)."""

    FLOAT_WEIGHT = "float_weight"  # weight kept float; only the activation is (fake-)quantized
    BLOCK_WEIGHT = "block_weight"  # FP8 / MX / NVFP4 / BFP bit-pattern codes with block scales
    DECOMPOSED = "decomposed"  # LLM.int8: INT8 normal input channels + float outlier channels
    CORRECTED = "corrected"  # INTn weights plus float LoRC / kept-weight terms
    INTEGER = "integer"  # plain INTn codes with float scales (and zero points, groups, g_idx)


def linear_form(q: QLinear, name: str = "") -> LinearForm:
    """The form of `q`; `name` (the op) only labels the error for unsupported combinations."""
    where = f"node '{name}': " if name else ""
    if q.codes is None:
        if q.has_corrections or q.fp_channels is not None:
            msg = f"{where}corrections or float channels without quantized weight codes"
            raise UnsupportedOpError(msg)
        return LinearForm.FLOAT_WEIGHT
    if not q.integer_weight:
        if q.has_corrections or q.fp_channels is not None:
            msg = (
                f"{where}LoRC / kept weights / LLM.int8 channels apply to integer weights only, not {q.spec}"
            )
            raise UnsupportedOpError(msg)
        return LinearForm.BLOCK_WEIGHT
    if q.fp_channels is not None:
        if q.has_corrections:
            msg = f"{where}LLM.int8 decomposition with LoRC / kept weights is not lowered"
            raise UnsupportedOpError(msg)
        return LinearForm.DECOMPOSED
    if q.has_corrections:
        return LinearForm.CORRECTED
    return LinearForm.INTEGER
