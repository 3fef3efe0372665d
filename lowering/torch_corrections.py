"""Float corrections on top of a quantized linear: low-rank compensation and kept (protected) weights.

``y = QuantLinear(x) + (x Vᵀ) Uᵀ + sparse(x)``: the quantized main path is untouched (any kernel
may run it) and the corrections are two small extra terms on the same (activation-quantized)
input. LoRC is a ``[r, in]`` then ``[out, r]`` matmul pair (ZeroQuant-V2); the kept weights are
a sparse term ``y[..., rows[k]] += x[..., cols[k]] * values[k]`` (an ``index_add`` over the
``k`` kept entries, whose quantized codes are the zero code so nothing is counted twice).
"""

from __future__ import annotations

import torch

from qpass.lowering.torch_backend import QuantLinear
from qpass.quant.qlinear import QLinear, fake_quant_act


class CorrectedQuantLinear(QuantLinear):
    """A QuantLinear plus its LoRC pair and sparse kept-weight term (saved as buffers)."""

    def __init__(self, q: QLinear, weight_fp: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__(q, weight_fp, bias)
        self.register_buffer("lorc_u", None if q.lorc_u is None else q.lorc_u.to(torch.float32).contiguous())
        self.register_buffer("lorc_v", None if q.lorc_v is None else q.lorc_v.to(torch.float32).contiguous())
        self.register_buffer("outlier_rows", q.outlier_rows)
        self.register_buffer("outlier_cols", q.outlier_cols)
        self.register_buffer(
            "outlier_values", None if q.outlier_values is None else q.outlier_values.to(torch.float32)
        )

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The float terms for input ``x`` ``[..., in]`` (activation quantization applied as in the main path)."""
        x = x.to(torch.float32)
        if self.act is not None:
            x = fake_quant_act(x, self.act, self.act_qparams)
        out_features = self._weight.shape[0]
        y = x.new_zeros((*x.shape[:-1], out_features))
        if self.lorc_u is not None:
            y = y + (x @ self.lorc_v.T) @ self.lorc_u.T
        if self.outlier_values is not None:
            y = y.index_add(-1, self.outlier_rows, x[..., self.outlier_cols] * self.outlier_values)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (super().forward(x).to(torch.float32) + self.correction(x)).to(x.dtype)

    def extra_repr(self) -> str:
        extra = ""
        if self.lorc_u is not None:
            extra += f", lorc_rank={self.lorc_u.shape[1]}"
        if self.outlier_values is not None:
            extra += f", kept={self.outlier_values.numel()}"
        return super().extra_repr() + extra
