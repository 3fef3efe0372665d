"""Torch lowering of a quantized Conv: `QuantConv`, the reference arithmetic of the ONNX QDQ form.

y = Q_out(conv(Q_a(x), dequant(W).reshape(out, in/groups, k...), b)): the activation
fake-quantized (static per tensor, or dynamic per tensor), the weight dequantized once from its
codes on the [out, in/groups * k...] view, and for W8A8 static the output fake-quantized with its
calibrated per-tensor parameters, as ORT's QLinearConv requantizes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpass.quant.qlinear import QLinear, dequantize_weight, fake_quant_act, fake_quant_static

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantConv(torch.nn.Module):
    """A Conv1d/2d/3d with quantized weight codes (per output channel or per group along in/groups * k)."""

    def __init__(
        self,
        q: QLinear,
        weight_fp: torch.Tensor | None,
        bias: torch.Tensor | None,
        stride,
        padding,
        dilation,
        groups: int,
    ) -> None:
        super().__init__()
        self.register_buffer("weight_codes", None if q.codes is None else q.codes.contiguous())
        self.register_buffer("weight_scales", None if q.scales is None else q.scales.contiguous())
        self.register_buffer(
            "weight_zero_points", None if q.zero_points is None else q.zero_points.contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.conv_shape = tuple(q.conv_shape)
        self.group_size, self.bits = q.group_size, q.bits
        w = weight_fp if q.codes is None else q.dequantized_weight()
        self.register_buffer(
            "_weight", w.reshape(self.conv_shape).to(torch.float32).contiguous(), persistent=False
        )
        self.act, self.act_qparams, self.out_qparams = q.act, q.act_qparams, q.out_qparams
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._conv = _CONV[len(self.conv_shape) - 2]
        self.packed_only = False  # True while saving: forward reads the codes, not the float cache

    def dequantized(self) -> torch.Tensor:
        """The weight from the saved codes (what `_weight` caches)."""
        if self.weight_codes is None:
            return self._weight
        w = dequantize_weight(
            self.weight_codes, self.weight_scales, self.weight_zero_points, group_size=self.group_size
        )
        return w.reshape(self.conv_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        if self.act is not None:
            x = fake_quant_act(x, self.act, self.act_qparams)
        w = self.dequantized() if self.packed_only and self.weight_codes is not None else self._weight
        y = self._conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.out_qparams is not None:
            y = fake_quant_static(y, self.out_qparams)
        return y.to(dtype)

    def extra_repr(self) -> str:
        w = (
            "fp"
            if self.weight_codes is None
            else f"int{self.bits}/" + (f"g{self.group_size}" if self.group_size else "ch")
        )
        a = "fp" if self.act is None else f"{self.act.format} {self.act.granularity.value}"
        a += " dynamic" if self.act is not None and self.act.dynamic else ""
        out = "" if self.out_qparams is None else ", out=int8 static"
        shape = "x".join(map(str, self.conv_shape))
        return f"weight=[{shape}] {w}, act={a}{out}, stride={self.stride}, groups={self.groups}"


def conv_arguments(packet: str, args: tuple, kwargs: dict) -> tuple:
    """(stride, padding, dilation, groups) of an aten conv1d/2d/3d or convolution call."""
    if packet == "convolution":  # (x, w, b, stride, padding, dilation, transposed, output_padding, groups)
        return args[3], args[4], args[5], args[8]
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    return tuple(
        args[3 + i] if len(args) > 3 + i else kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults, strict=True))
    )
