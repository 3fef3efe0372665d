"""Torch lowering of an LLM.int8()-decomposed linear (`passes/decompose.py`).

    y = int8_gemm(Q_tok(x[..., N]), W8[:, N]) + x[..., O] @ W[:, O]^T + b

One op, `qpass::int8_decomp_gemm` (kernels/int8_decomp.py): on CUDA a single Triton launch runs
the int32 K-loop over the normal channels N and a float K-loop over the outlier channels O into
the same tile; on CPU `torch._int_mm` plus a float32 matmul. The per-token quantization of the
normal channels is `qpass::quantize_per_token`, as in the plain W8A8 path. Layers whose formats
have no integer kernel (narrower weights) run the fake-quant reference of the same math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpass.lowering.torch_backend import LinearKernel, QuantLinear
from qpass.quant.qlinear import QLinear, dequantize_weight, fake_quant_act


class DecomposedQuantLinear(QuantLinear):
    """A QuantLinear whose `fp_channels` input channels bypass quantization (float weight columns)."""

    def __init__(self, q: QLinear, weight_fp: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__(q, weight_fp, bias)
        k = q.codes.shape[1]
        normal = torch.ones(k, dtype=torch.bool)
        normal[q.fp_channels] = False
        self.register_buffer("fp_channels", q.fp_channels.to(torch.int64).contiguous())
        self.register_buffer("fp_weight", q.fp_weight.to(torch.float32).contiguous())
        self.register_buffer("_normal", normal.nonzero().flatten(), persistent=False)
        self.register_buffer("_weight", q.effective_weight().contiguous(), persistent=False)
        if self.kernel is LinearKernel.W8A8_DECOMP:
            codes = self.weight_codes.to(torch.int8).index_select(1, self._normal)
            self.register_buffer("_w_kn", codes.T.contiguous(), persistent=False)  # [Kn, N]
            self.register_buffer(
                "_w_scale", self.weight_scales[:, 0].to(torch.float32).contiguous(), persistent=False
            )
            self.register_buffer("_w_out_kn", self.fp_weight.T.contiguous(), persistent=False)  # [Ko, N]

    def gemm_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, a_scale, w8_kn, w_scale, x_out, w_out, bias) for `qpass::int8_decomp_gemm` on rows of x."""
        import qpass.kernels.w8a8  # noqa: F401 - registers torch.ops.qpass.quantize_per_token

        rows = x.reshape(-1, x.shape[-1])
        q, a_scale = torch.ops.qpass.quantize_per_token(rows.index_select(1, self._normal))
        x_out = rows.index_select(1, self.fp_channels)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return q, a_scale, self._w_kn, self._w_scale, x_out, self._w_out_kn, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is LinearKernel.W8A8_DECOMP:
            import qpass.kernels.int8_decomp  # noqa: F401 - registers torch.ops.qpass.int8_decomp_gemm

            y = torch.ops.qpass.int8_decomp_gemm(*self.gemm_operands(x), self._out_dtype(x))
            return y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return self._forward_decomp_reference(x)

    def _forward_decomp_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized normal channels, float outlier channels, x the effective weight."""
        dtype = x.dtype
        xf = x.to(torch.float32)
        xq = fake_quant_act(xf.index_select(-1, self._normal), self.act, None)
        xf = xf.index_copy(-1, self._normal, xq)
        if self.packed_only:
            w = dequantize_weight(self.weight_codes, self.weight_scales, None, None, self.element)
            w = w.index_copy(1, self.fp_channels, self.fp_weight)
        else:
            w = self._weight
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return F.linear(xf, w, bias).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp_channels={self.fp_channels.numel()}"
