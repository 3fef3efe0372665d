"""Guarded Triton import and the launch rules every kernel family shares.

`import qpass` must work where Triton is not installed (CPU machines, the ONNX path), so
kernel files import `triton` / `tl` from here and define kernels only when `HAS_TRITON`.
Triton decides at decoration time whether a kernel is compiled for a GPU or run by its
interpreter (`TRITON_INTERPRET=1`, read when `triton.jit` runs); CPU tensors can only go
through interpreted kernels, so `check_launchable` says so instead of failing inside Triton.
"""

from __future__ import annotations

import os

import torch

from qpass.errors import ConfigError

try:  # an optional dependency: the [dev] and [gpu] extras install it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """Kernels were (or will be) decorated for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error where a Triton kernel cannot run on these tensors."""
    if not HAS_TRITON:
        msg = f"kernel '{name}' needs Triton: pip install 'qpass[gpu]' (or use the torch reference)"
        raise ConfigError(msg)
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not interpreting():
        msg = (
            f"kernel '{name}' got tensors on {sorted(devices)}: Triton runs on CUDA, or on CPU only "
            "under TRITON_INTERPRET=1 set before triton is imported"
        )
        raise ConfigError(msg)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule of the PT2 ops: Triton on CUDA, the torch reference elsewhere."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
