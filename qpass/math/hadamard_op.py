"""The online Hadamard transform as a PT2 op: `qpass::hadamard_transform(x, signs) = fwht(x * signs)`.

Defined here, in the base layer, so the FX adapter can insert it (an online rotation) without
importing the kernels: its default implementation is the pure-torch O(n log n) transform
(`qpass.math.hadamard.fwht`). `qpass.kernels.hadamard` registers the Triton kernel for CUDA
tensors on the same op; the fake (meta) implementation lets torch.export / torch.compile trace it.
"""

from __future__ import annotations

import torch

from qpass.math.hadamard import fwht


def hadamard_reference(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """fwht(x * signs) over the last axis, in x's dtype: x @ (diag(signs) H_n)."""
    return fwht(x * signs.to(x.dtype), dim=-1)


@torch.library.custom_op("qpass::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Return x @ (diag(signs) H_n) over the last axis (n = signs.numel())."""
    return hadamard_reference(x, signs)


@hadamard_transform.register_fake
def _(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
