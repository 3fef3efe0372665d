"""Torch lowering: a quantized linear becomes a module holding INT8 weight codes and scales.

Each module picks its kernel once (`LinearKernel`, from the QLinear's formats): INT8 weights with
INT8 activations run a real integer GEMM (`qpass::int8_gemm`: Triton on CUDA, `torch._int_mm` on
CPU) after quantizing activations (`qpass::quantize_per_token`, or a static per-tensor rule);
INT4 weight-only layers run `qpass::w4a16_gemm` on CUDA, MXFP4 / MXFP8 (E4M3) / NVFP4 weights
`qpass::mx_gemm` (elements and block scales decoded in registers; activations, if quantized,
fake-quantized in their own blocks first). On CPU those two keep a dequantized float weight and
run the reference path, which is faster there; saving writes only the packed form.
Everything else takes the reference path: activations fake-quantized, the weight dequantized
once and cached.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from qpass.formats import ScaleType
from qpass.qconfig import ActGranularity
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear, dequantize_weight, fake_quant_act


class LinearKernel(enum.Enum):
    """Which compute path a QuantLinear runs (chosen from its formats, fixed at lowering)."""

    REFERENCE = "reference"  # fake-quantized activations x dequantized float32 weight
    W8A8_DYNAMIC = "w8a8_dynamic"  # per-token INT8 activations x per-channel INT8 weights, int32 GEMM
    W8A8_STATIC = "w8a8_static"  # per-tensor static INT8 activations x per-channel INT8 weights
    W4A16 = "w4a16"  # INT4 weights in groups, float activations (packed kernel on CUDA)
    W8A8_DECOMP = "w8a8_decomp"  # W8A8_DYNAMIC over the normal channels + float GEMM over outlier ones
    MX = "mx"  # MXFP4 / MXFP8 (E4M3) / NVFP4 weights, block scales decoded in the kernel (CUDA)


def select_kernel(q: QLinear) -> LinearKernel:
    """The fastest path whose result equals the reference up to float summation order."""
    form = linear_form(q)
    if form is LinearForm.FLOAT_WEIGHT:
        return LinearKernel.REFERENCE
    if form is LinearForm.BLOCK_WEIGHT:  # float / block formats: the MX kernel where it decodes them
        return LinearKernel.MX if mx_kernel_fits(q) else LinearKernel.REFERENCE
    if q.group_axis == "out":  # AdaDim groups along output rows: no packed kernel takes them
        return LinearKernel.REFERENCE
    int8_weight = q.bits == 8 and q.zero_points is None and q.per_channel and q.g_idx is None
    if form is LinearForm.DECOMPOSED:  # LLM.int8 decomposition (lowering/torch_decompose.py)
        per_token = (
            q.act is not None and q.act.format == "int8" and q.act.granularity is ActGranularity.PER_TOKEN
        )
        return LinearKernel.W8A8_DECOMP if int8_weight and per_token else LinearKernel.REFERENCE
    if int8_weight and q.act is not None and q.act.format == "int8":
        if q.act.dynamic and q.act.granularity is ActGranularity.PER_TOKEN:
            return LinearKernel.W8A8_DYNAMIC
        if q.act_qparams is not None:
            return LinearKernel.W8A8_STATIC
    if q.bits <= 4 and q.act is None:
        return LinearKernel.W4A16
    return LinearKernel.REFERENCE


def mx_kernel_fits(q: QLinear) -> bool:
    """Elements and scales `qpass.kernels.mx_gemm` decodes, blocks along the input channels, no g_idx."""
    from qpass.kernels.mx_gemm import MX_ELEMENTS, MX_SCALES

    spec = q.spec
    if spec is None or q.codes is None or q.g_idx is not None or q.group_size is None:
        return False
    if spec.element not in MX_ELEMENTS or spec.scale_type not in MX_SCALES:
        return False
    if spec.scale_type is ScaleType.E4M3 and q.tensor_scale is None:
        return False
    return q.act is None or q.act.dynamic


class QuantLinear(torch.nn.Module):
    """y = Q_a(x) @ dequant(W)^T + b: integer weight codes with per-channel or per-group scales.

    The codes, scales and zero points are the saved state; the dequantized weight is a cache.
    """

    def __init__(self, q: QLinear, weight_fp: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_codes", None if q.codes is None else q.codes.contiguous())
        self.register_buffer("weight_scales", None if q.scales is None else q.scales.contiguous())
        self.register_buffer(
            "weight_zero_points", None if q.zero_points is None else q.zero_points.contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight_g_idx", q.g_idx)
        # set by `fuse_rotations_into_quantize`: the input is rotated by diag(signs) H first
        self.register_buffer("rotation_signs", None)
        w = weight_fp if q.codes is None else q.dequantized_weight()
        self.register_buffer("_weight", w.contiguous(), persistent=False)
        self.bits, self.group_size = q.bits, q.group_size
        # float/block formats store bit-pattern codes: their element type decodes them
        self.element = None if q.codes is None or q.integer_weight else q.spec.element
        self.act = q.act
        self.act_qparams = q.act_qparams
        self.group_axis = q.group_axis
        self.kernel = select_kernel(q)
        self.spec = q.spec
        self.tensor_scale = q.tensor_scale
        # True while saving: forward reads only the saved (packed) state, never the float cache
        self.packed_only = False
        self._init_kernel_buffers()

    def _init_kernel_buffers(self) -> None:
        """Derived (non-persistent) operands of the integer kernels, rebuilt from the saved codes."""
        if self.kernel in (LinearKernel.W8A8_DYNAMIC, LinearKernel.W8A8_STATIC):
            codes = self.weight_codes.to(torch.int8)
            # torch._int_mm is ~2.5x faster on CPU with its weight as a contiguous [K, N] matrix
            self.register_buffer("_w_kn", codes.T.contiguous(), persistent=False)
            self.register_buffer(
                "_w_scale", self.weight_scales[:, 0].to(torch.float32).contiguous(), persistent=False
            )
        if self.kernel is LinearKernel.W8A8_STATIC:
            qp = self.act_qparams
            shift = 128 if qp.qmin >= 0 else 0  # unsigned codes run as int8: q - 128, corrected below
            # (q - zp) @ W = (q - shift) @ W + (shift - zp) * colsum(W): the constant folds into the bias
            colsum = self.weight_codes.to(torch.float32).sum(dim=1)
            fused = qp.scale * self._w_scale * (shift - qp.zero_point) * colsum
            if self.bias is not None:
                fused = fused + self.bias.to(torch.float32)
            self.register_buffer("_bias_fused", fused.contiguous(), persistent=False)
            self._shift = shift
        if self.kernel is LinearKernel.W4A16:
            from qpass.kernels.w4a16 import pack_int4

            symmetric = self.weight_zero_points is None
            self.register_buffer("_packed", pack_int4(self.weight_codes, symmetric), persistent=False)
            self._w4_group = self.group_size or self.weight_codes.shape[1]
        if self.kernel is LinearKernel.MX:
            from qpass.kernels.mx_gemm import pack_mx_codes

            mx = pack_mx_codes(self.weight_codes, self.weight_scales, self.spec, self.tensor_scale)
            self.register_buffer("_mx_data", mx.data, persistent=False)
            self.register_buffer("_mx_scale_bits", mx.scale_bits, persistent=False)
            self._mx = mx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is LinearKernel.W8A8_DYNAMIC:
            return self._forward_w8a8(x, None)
        if self.kernel is LinearKernel.W8A8_STATIC:
            return self._forward_w8a8(x, self.act_qparams)
        if self.kernel is LinearKernel.W4A16 and (x.is_cuda or self.packed_only):
            return self._forward_w4a16(x)
        if self.kernel is LinearKernel.MX and (x.is_cuda or self.packed_only):
            return self._forward_mx(x)
        return self._forward_reference(x)

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32

    def _forward_w8a8(self, x: torch.Tensor, qp) -> torch.Tensor:
        import qpass.kernels.w8a8  # noqa: F401 - registers torch.ops.qpass.{quantize_per_token,int8_gemm}

        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, k)
        if qp is None and self.rotation_signs is not None:
            q, a_scale = torch.ops.qpass.quantize_per_token_hadamard(rows, self.rotation_signs)
            bias = None if self.bias is None else self.bias.to(torch.float32)
        elif qp is None:
            q, a_scale = torch.ops.qpass.quantize_per_token(rows)
            bias = None if self.bias is None else self.bias.to(torch.float32)
        else:
            codes = torch.clamp(
                torch.round(rows.to(torch.float32) / qp.scale) + qp.zero_point, qp.qmin, qp.qmax
            )
            q = (codes - self._shift).to(torch.int8)
            a_scale = torch.full((rows.shape[0],), qp.scale, dtype=torch.float32, device=x.device)
            bias = self._bias_fused
        y = torch.ops.qpass.int8_gemm(q, a_scale, self._w_kn, self._w_scale, bias, self._out_dtype(x))
        return y.reshape(*lead, -1).to(x.dtype)

    def _forward_w4a16(self, x: torch.Tensor) -> torch.Tensor:
        import qpass.kernels.w4a16  # noqa: F401 - registers torch.ops.qpass.w4a16_gemm

        lead, k = x.shape[:-1], x.shape[-1]
        g_idx = self.weight_g_idx
        y = torch.ops.qpass.w4a16_gemm(
            x.reshape(-1, k), self._packed, self.weight_scales, self.weight_zero_points, g_idx, self._w4_group
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1)

    def _forward_mx(self, x: torch.Tensor) -> torch.Tensor:
        import qpass.kernels.mx_gemm  # noqa: F401 - registers torch.ops.qpass.mx_gemm

        dtype, lead, k = x.dtype, x.shape[:-1], x.shape[-1]
        if self.act is not None:
            x = fake_quant_act(x.to(torch.float32), self.act, None)
        mx = self._mx
        y = torch.ops.qpass.mx_gemm(
            x.reshape(-1, k),
            self._mx_data,
            self._mx_scale_bits,
            mx.tensor_scale,
            int(mx.element),
            int(mx.scale),
            mx.group,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1).to(dtype)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.rotation_signs is not None:
            from qpass.kernels.hadamard import hadamard_reference

            x = hadamard_reference(x, self.rotation_signs)
        if self.act is not None:
            x = fake_quant_act(x.to(torch.float32), self.act, self.act_qparams)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        if not (self.packed_only and self.weight_codes is not None):
            w = self._weight
        else:
            w = dequantize_weight(
                self.weight_codes,
                self.weight_scales,
                self.weight_zero_points,
                self.weight_g_idx,
                self.element,
                getattr(self, "group_axis", "in"),
                self.group_size,
            )
        return F.linear(x.to(torch.float32), w, bias).to(dtype)

    def extra_repr(self) -> str:
        out, inp = self._weight.shape
        w = (
            "fp"
            if self.weight_codes is None
            else (self.element.value if self.element is not None else f"int{self.bits}")
            + "/"
            + (f"g{self.group_size}" if self.group_size else "ch")
        )
        a = "fp" if self.act is None else f"{self.act.format} {self.act.granularity.value}"
        a += " dynamic" if self.act is not None and self.act.dynamic else ""
        return f"out={out}, in={inp}, weight={w}, act={a}, kernel={self.kernel.value}"
