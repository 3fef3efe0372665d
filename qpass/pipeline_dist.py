"""Calibration across processes (torch.distributed): each rank runs a share of the batches, and
the statistics are summed over ranks before anything is planned from them.

Under an initialised process group (gloo on CPU, nccl on CUDA; `torchrun` or the caller's own
`init_process_group`), the sequential pipeline gives rank r the batches r, r + N, r + 2N...:
every block's forward passes are split N ways. After each block's statistics are finished they
are all-reduced (sums for X^T X, moments and counts, max/min for the ranges), so every rank plans
from the statistics of all batches; GPTQ is deterministic, so every rank then holds the same
codes and propagates its own batches through the same quantized block. The sums are taken in
another order than one process takes them, so the Hessians agree to float64 rounding (about 1e-16
relative), not bit for bit. Not split yet: the GPTQ solves themselves (each rank runs all of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from qpass.calibration import Stats
from qpass.errors import ConfigError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_batches(batches: Sequence[T]) -> list[T]:
    """The batches of the current rank: r, r + N, r + 2N... (all of them in one process)."""
    rank, size = world()
    if size > 1 and len(batches) < size:
        msg = f"{len(batches)} calibration batches cannot be split over {size} processes"
        raise ConfigError(msg)
    return list(batches[rank::size])


def _reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    import torch.distributed as dist

    out = t.contiguous().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_stats(stats: Stats) -> Stats:
    """Every value's statistics over all ranks (in place); a no-op in one process."""
    _, size = world()
    if size == 1:
        return stats
    import torch.distributed as dist

    sum_op, max_op, min_op = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
    for name in sorted(stats.values):  # the same order on every rank
        st = stats.values[name]
        if st.samples is not None:
            msg = f"'{name}': sampled rows (StatKind.SAMPLES) are not combined across processes yet"
            raise ConfigError(msg)
        st.absmax, st.max, st.min = (
            _reduce(st.absmax, max_op),
            _reduce(st.max, max_op),
            _reduce(st.min, min_op),
        )
        st.count = int(_reduce(torch.tensor([st.count], dtype=torch.int64), sum_op)[0])
        for field in ("sum", "sumsq", "counts", "xtx"):
            value = getattr(st, field)
            if value is not None:
                setattr(st, field, _reduce(value, sum_op))
    return stats


def all_reduce_sums(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> None:
    """Sum `tensors[name]` over ranks for each of `names` present (in place in the dict)."""
    _, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    for name in sorted(n for n in names if n in tensors):
        tensors[name] = _reduce(tensors[name], dist.ReduceOp.SUM)
