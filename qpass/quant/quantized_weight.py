"""A quantized weight (``QuantizedWeight``) and the checks every weight quantizer shares.

The quantizers (`qpass.quant.rtn`, `gptq`, `lorc`, `protect`) are backend-neutral math on
plain tensors (the graph integration reads weights through the graph view and calls them).
Canonical layout: ``W`` is ``[out, in]`` with the reduction axis last
(a ``torch.nn.Linear`` weight; the graph view's ``WeightRef`` hides Gemm ``transB`` and
MatMul sides), and ``H = XᵀX`` is the ``[in, in]`` second-moment accumulator of the
layer's inputs gathered by calibration (any positive multiple works: every algorithm
here is invariant to scaling ``H``).

Number formats come from ``qpass.formats``: a ``QuantSpec`` says the element type and who
shares a scale; its ``PER_GROUP`` axis must be the last (``in``) axis and its
``PER_CHANNEL`` axis the first (``out``), so a group is ``group_size`` consecutive input
channels of one output row (ONNX blocked / MatMulNBits layout). Scales, zero points and
rounding are the formats' own (``compute_scale_zero_point``, ``quantize``), never
re-derived here.

The result, ``QuantizedWeight``, carries codes in the ORIGINAL column order, scales
``[out, n_groups]`` and ``g_idx`` (group of each input channel), so that
``W_q[o, j] = (value(codes[o, j]) - zp[o, g_idx[j]]) * scales[o, g_idx[j]]``: the formula
of ONNX Runtime's ``MatMulNBits`` with its ``g_idx`` input (int32 ``[K]``; the contrib-op
spec marks it deprecated, ORT 1.32's CPU kernel still applies it). Without act-order,
``g_idx[j] == j // group_size``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from qpass.errors import ConfigError, PreconditionError
from qpass.formats import Granularity, QuantizedTensor, QuantSpec, ScaleType, get_format
from qpass.formats.quantize import code_values
from qpass.threads import single_thread

__all__ = [
    "QuantizedWeight",
    "as_matrix",
    "check_hessian",
    "check_spec",
    "check_weight",
    "one_cpu_thread",
]


# ------------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: what lowering needs, in the original column order.

    * ``codes``: ``[out, in]``, the formats' code convention (int8 signed values for
      symmetric integers, uint8 for asymmetric integers, uint8 bit patterns for floats).
    * ``scales``: float32 ``[out, n_groups]``, the effective scale (E8M0/E4M3 scales are
      stored decoded; they are exact powers of two / FP8 values times the tensor scale).
    * ``zero_points``: ``[out, n_groups]`` for asymmetric integers (uint8; float32 with the
      spec's ``float_zero_point``), else None.
    * ``group_size``: input channels per group (``in`` for per-channel and per-tensor).
    * ``g_idx``: int32 ``[in]``, the group of each input channel (MatMulNBits ``g_idx``).
    * ``perm``: the act-order processing order (``perm[k]`` = the k-th column quantized),
      or None. Informational: codes and scales are already in the original order.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    spec: QuantSpec
    kept: torch.Tensor | None = None  # gptq(keep=...): float32 [out, in], the kept weights' values, else 0
    tensor_scale: float | None = None  # NVFP4: scales = e4m3(scale byte) * tensor_scale (kernels re-encode)
    # "out" (AdaDim): groups of `group_size` output rows per input column; scales and zero
    # points are then [out_groups, in] and g_idx is unused
    group_axis: str = "in"

    @property
    def shape(self) -> torch.Size:
        """``[out, in]``."""
        return self.codes.shape

    @property
    def n_groups(self) -> int:
        """Number of scale groups per output row."""
        return int(self.scales.shape[1])

    @property
    def sequential_groups(self) -> bool:
        """True when ``g_idx[j] == j // group_size`` (plain blocked layout, no ``g_idx`` needed)."""
        if self.group_axis == "out":
            return True
        j = torch.arange(self.g_idx.numel(), device=self.g_idx.device)
        return bool(torch.equal(self.g_idx.to(torch.int64), j // self.group_size))

    def dequantized(self) -> torch.Tensor:
        """float32 ``W_q`` ``[out, in]`` in the original column order (the MatMulNBits formula)."""
        if self.group_axis == "out":
            g = torch.arange(self.codes.shape[0], device=self.codes.device) // self.group_size
            v = code_values(self.codes, self.spec.element)
            if self.zero_points is not None:
                v = v - self.zero_points[g, :].to(torch.float32)
            return v * self.scales[g, :]
        g = self.g_idx.to(torch.int64)
        v = code_values(self.codes, self.spec.element)
        if self.zero_points is not None:
            v = v - self.zero_points[:, g].to(torch.float32)
        return v * self.scales[:, g]

    def to_quantized_tensor(self) -> QuantizedTensor:
        """The formats' ``QuantizedTensor`` (for ``.pack()``), when groups are sequential.

        Needs float32 scales (MX/NVFP4 scale bytes are not kept here) and
        ``sequential_groups``; act-order with dynamic groups needs ``g_idx`` instead.
        """
        if self.spec.scale_type is not ScaleType.FLOAT32:
            msg = f"to_quantized_tensor needs scale_type=float32, got {self.spec.scale_type.value}"
            raise PreconditionError(msg)
        if self.group_axis == "out":
            msg = (
                "to_quantized_tensor: groups run along the output rows (group_axis out); no blocked-K layout"
            )
            raise PreconditionError(msg)
        if not self.sequential_groups:
            msg = "to_quantized_tensor: g_idx is not sequential (act-order with dynamic groups); lower with g_idx"
            raise PreconditionError(msg)
        g = self.spec.granularity
        scale, zp = self.scales, self.zero_points
        if g is Granularity.PER_TENSOR:
            scale = scale[:1, :1]
            zp = None if zp is None else zp[:1, :1]
        return QuantizedTensor(codes=self.codes, scale=scale.contiguous(), spec=self.spec, zero_point=zp)


# ------------------------------------------------------------------------------ validation


def as_matrix(x: Any, name: str) -> torch.Tensor:
    """Argument ``name`` as a finite floating 2-D torch tensor (numpy arrays converted); ConfigError otherwise."""
    if hasattr(x, "__array__") and not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        msg = f"argument '{name}' must be a torch.Tensor or numpy array, got {type(x).__name__}"
        raise ConfigError(msg)
    if not x.is_floating_point():
        msg = f"argument '{name}' must be a floating-point tensor, got dtype {x.dtype}"
        raise ConfigError(msg)
    if x.ndim != 2:
        msg = f"argument '{name}' must be 2-D, got shape {list(x.shape)}"
        raise ConfigError(msg)
    if not bool(torch.isfinite(x).all()):
        msg = f"argument '{name}' contains NaN or Inf"
        raise ConfigError(msg)
    return x


def check_weight(w: Any) -> torch.Tensor:
    """The weight argument ``W`` as a non-empty ``[out, in]`` matrix."""
    w = as_matrix(w, "W")
    if w.numel() == 0:
        msg = f"argument 'W' is empty (shape {list(w.shape)})"
        raise ConfigError(msg)
    return w


def check_hessian(h: Any, n_in: int, name: str = "H") -> torch.Tensor:
    """The argument ``name`` (``H = XᵀX``) as an ``[in, in]`` matrix for a weight with ``n_in`` inputs."""
    h = as_matrix(h, name)
    if tuple(h.shape) != (n_in, n_in):
        msg = (
            f"argument '{name}' must be [in, in] = [{n_in}, {n_in}] for W [out, {n_in}], got {list(h.shape)}"
        )
        raise ConfigError(msg)
    return h


def check_spec(spec: Any, n_in: int) -> tuple[QuantSpec, int]:
    """Check the spec against the canonical layout; return it with the group size."""
    if isinstance(spec, str):
        spec = get_format(spec)
    if not isinstance(spec, QuantSpec):
        msg = f"argument 'spec' must be a QuantSpec or a format name, got {type(spec).__name__}"
        raise ConfigError(msg)
    g = spec.granularity
    if g is Granularity.PER_TOKEN:
        msg = (
            "argument 'spec': granularity=per_token is dynamic (activations); weights need per_group/channel"
        )
        raise ConfigError(msg)
    if g is Granularity.PER_GROUP:
        if spec.resolved_axis(2) != 1:
            msg = f"argument 'spec': per_group weights are blocked along the last (in) axis, got axis={spec.axis}"
            raise ConfigError(msg)
        gs = int(spec.group_size)
        if n_in % gs and not spec.pad_tail:  # a short last group (576 = 4.5 x 128), as MatMulNBits pads it
            spec = spec.replace(pad_tail=True)
        return spec, gs
    if g is Granularity.PER_CHANNEL and spec.resolved_axis(2) != 0:
        msg = f"argument 'spec': per_channel weights have one scale per output row (axis=0), got axis={spec.axis}"
        raise ConfigError(msg)
    return spec, n_in


def one_cpu_thread(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """GPTQ's column loop and LoRC's small decompositions run on one thread (CPU tensors)."""
    return single_thread(device.type == "cpu")
