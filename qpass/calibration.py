"""Calibration: stream batches through a graph and collect per-input-channel statistics.

Statistics are keyed by value name, channel axis last (a scalar is one row of one channel; no
statistic assumes a batch axis). Rows masked out by an `attention_mask` in the batch are ignored
(pad tokens would wreck static ranges): a 0/1 mask keeps its nonzero positions, a float additive
mask (0 keep, negative or -inf drop) its positions above -1.

Infinite entries are data (an additive -inf mask flowing into a value) and are ignored by every
statistic: ranges and absmax are over the finite entries of each channel (a channel with none
gets 0), moments count each channel's finite entries, X^T X and the moments' sums drop them, and
the sampled rows hold them as 0. A NaN in a calibrated value is an error naming the
value, the batch and the row.
Saved as .npz (never pickled) or .safetensors.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qpass.errors import CalibrationError
from qpass.graph.refs import ValueRef
from qpass.graph.view import GraphView
from qpass.io import atomic_path


class StatKind(enum.Enum):
    """What to accumulate for a value (absmax/min/max are always kept)."""

    RANGE = "range"  # per-channel absmax, min, max
    MOMENTS = "moments"  # per-channel mean and variance
    XTX = "xtx"  # second-moment matrix X^T X (GPTQ Hessian)
    SAMPLES = "samples"  # a fixed-size random subset of rows, for searches that measure output error


@dataclass(frozen=True)
class StatRequest:
    """A pass's request: these statistics of this value."""

    value: ValueRef
    kinds: frozenset[StatKind] = frozenset({StatKind.RANGE})
    channel_axis: int = -1  # a conv input's channels are axis 1 (NCHW); kept under `stat_key`

    @property
    def key(self) -> str:
        return stat_key(self.value, self.channel_axis)


def stat_key(value: ValueRef, channel_axis: int = -1) -> str:
    """Where `Stats` keeps a value's statistics: its name, plus '#axis<k>' for a channel axis not last."""
    return value.name if channel_axis == -1 else f"{value.name}#axis{channel_axis}"


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation (channel = last axis)."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # per-channel number of finite entries (with MOMENTS)

    @property
    def channels(self) -> int:
        return int(self.absmax.numel())

    @property
    def mean(self) -> torch.Tensor:
        if self.sum is None:
            msg = "mean was not collected (request StatKind.MOMENTS)"
            raise CalibrationError(msg)
        n = self.counts.clamp_min(1) if self.counts is not None else max(self.count, 1)
        return self.sum / n

    @property
    def var(self) -> torch.Tensor:
        if self.sumsq is None:
            msg = "variance was not collected (request StatKind.MOMENTS)"
            raise CalibrationError(msg)
        mean = self.mean
        n = self.counts.clamp_min(1) if self.counts is not None else max(self.count, 1)
        return (self.sumsq / n - mean * mean).clamp_min(0)

    @property
    def tensor_min(self) -> float:
        return float(self.min.min())

    @property
    def tensor_max(self) -> float:
        return float(self.max.max())


_FIELDS = ("absmax", "min", "max", "sum", "sumsq", "xtx", "samples", "counts")


@dataclass
class Stats:
    """Statistics for many values, keyed by value name."""

    values: dict[str, ChannelStats] = field(default_factory=dict)

    def __getitem__(self, name: str | ValueRef) -> ChannelStats:
        key = name.name if isinstance(name, ValueRef) else name
        try:
            return self.values[key]
        except KeyError:
            msg = f"no calibration statistics for value '{key}'"
            raise CalibrationError(msg) from None

    def __contains__(self, name: str | ValueRef) -> bool:
        return (name.name if isinstance(name, ValueRef) else name) in self.values

    def save(self, path: str | os.PathLike) -> None:
        """Write to .npz or .safetensors atomically."""
        arrays: dict[str, np.ndarray] = {}
        for name, st in self.values.items():
            for f in _FIELDS:
                t = getattr(st, f)
                if t is not None:
                    arrays[f"{name}::{f}"] = t.detach().cpu().numpy()
            arrays[f"{name}::count"] = np.asarray([st.count], dtype=np.int64)
        with atomic_path(path) as tmp:
            if Path(path).suffix == ".safetensors":
                from safetensors.numpy import save_file

                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
            else:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """Read statistics written by `save` (no pickle)."""
        path = Path(path)
        if not path.is_file():
            msg = f"{path}: no such statistics file"
            raise CalibrationError(msg)
        try:
            if path.suffix == ".safetensors":
                from safetensors.numpy import load_file

                arrays = load_file(str(path))
            else:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            msg = f"{path}: unreadable statistics file ({type(exc).__name__}: {exc})"
            raise CalibrationError(msg) from exc
        grouped: dict[str, dict[str, Any]] = {}
        for key, arr in arrays.items():
            name, _, f = key.rpartition("::")
            grouped.setdefault(name, {})[f] = arr
        out = cls()
        for name, fields in grouped.items():
            kw = {f: torch.from_numpy(np.array(fields[f])) for f in _FIELDS if f in fields}
            out.values[name] = ChannelStats(count=int(fields["count"][0]), **kw)
        return out


class _Accumulator:
    """Streams one value's batches into a ChannelStats."""

    def __init__(self, name: str, kinds: frozenset[StatKind], max_samples: int, seed: int) -> None:
        self.name = name
        self.kinds = kinds
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: ChannelStats | None = None
        self.seen = 0

    def update(self, rows: torch.Tensor, where: str = "") -> None:
        rows = rows.detach().to(torch.float32)
        if rows.numel() == 0:
            return
        finite = torch.isfinite(rows)
        clean = None if bool(finite.all()) else torch.where(finite, rows, 0.0)
        if clean is not None and bool(torch.isnan(rows).any()):
            row = int(torch.isnan(rows).any(1).int().argmax())
            msg = f"calibration produced NaN at '{self.name}' ({where}row {row}): the model computes NaN on this data"
            raise CalibrationError(msg)
        if clean is None:
            amax, amin, absmax = rows.amax(0), rows.amin(0), rows.abs().amax(0)
        else:  # infinite entries are data (an additive mask), not a range: over finite entries only
            inf = torch.tensor(float("inf"))
            amax, amin = torch.where(finite, rows, -inf).amax(0), torch.where(finite, rows, inf).amin(0)
            absmax = clean.abs().amax(0)
        st = self.stats
        if st is None:
            c = rows.shape[1]
            st = self.stats = ChannelStats(absmax=torch.zeros(c), min=amin.clone(), max=amax.clone())
            if StatKind.MOMENTS in self.kinds:
                st.sum, st.sumsq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
                st.counts = torch.zeros(c, dtype=torch.float64)
            if StatKind.XTX in self.kinds:
                st.xtx = torch.zeros(c, c, dtype=torch.float64)
        elif rows.shape[1] != st.channels:
            msg = f"value '{self.name}' changed width between batches ({st.channels} -> {rows.shape[1]})"
            raise CalibrationError(msg)
        torch.maximum(st.absmax, absmax, out=st.absmax)
        torch.minimum(st.min, amin, out=st.min)
        torch.maximum(st.max, amax, out=st.max)
        st.count += rows.shape[0]
        r64 = (
            (rows if clean is None else clean).to(torch.float64)
            if st.sum is not None or st.xtx is not None
            else None
        )
        if st.sum is not None and st.sumsq is not None and st.counts is not None and r64 is not None:
            st.sum += r64.sum(0)
            st.sumsq += (r64 * r64).sum(0)
            st.counts += finite.sum(0).to(torch.float64)
        if st.xtx is not None and r64 is not None:
            st.xtx += r64.T @ r64
        if StatKind.SAMPLES in self.kinds:
            self._reservoir(rows if clean is None else clean)

    def finish(self) -> ChannelStats | None:
        """The statistics; a channel that saw no finite entry gets min = max = 0."""
        st = self.stats
        if st is not None:
            empty = st.min > st.max
            if bool(empty.any()):
                st.min[empty] = 0.0
                st.max[empty] = 0.0
            if st.samples is None and StatKind.SAMPLES in self.kinds:
                st.samples = torch.empty(0, st.channels)
        return st

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Uniform sample of rows over the whole stream (vectorised reservoir sampling)."""
        st = self.stats
        assert st is not None
        n = rows.shape[0]
        if st.samples is None:
            st.samples = torch.empty(0, rows.shape[1])
        if n == 0:
            return
        room = self.max_samples - st.samples.shape[0]
        if room > 0:
            take = rows[:room]
            st.samples = torch.cat([st.samples, take])
            rows = rows[room:]
            self.seen += take.shape[0]
            n = rows.shape[0]
        if n == 0:
            return
        idx = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        keep = torch.rand(n, generator=self.gen, dtype=torch.float64) < (self.max_samples / (idx + 1))
        slots = torch.randint(0, self.max_samples, (n,), generator=self.gen)
        for i in torch.nonzero(keep).flatten().tolist():
            st.samples[slots[i]] = rows[i]
        self.seen += n


MASK_KEYS = ("attention_mask", "mask")  # batch entries read as a [batch, seq] padding mask


def _row_mask(batch: Any, value: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask flattened to rows, when it lines up with the value's leading dims."""
    mask = None
    if isinstance(batch, Mapping):
        mask = next((batch[k] for k in MASK_KEYS if k in batch), None)
    if mask is None or value.dim() < 3:
        return None
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tuple(mask.shape) != tuple(value.shape[:2]):
        return None
    return keep_positions(mask).reshape(-1)


def keep_positions(mask: torch.Tensor) -> torch.Tensor:
    """Which positions a padding mask keeps: nonzero of a 0/1 mask; above -1 of an additive mask."""
    if mask.is_floating_point() and bool((mask < 0).any()):
        return mask > -1
    return mask != 0


def as_rows(value: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """[..., C] -> [N, C], dropping rows that the batch's attention mask marks as padding."""
    rows = value.reshape(-1, value.shape[-1]) if value.dim() > 1 else value.reshape(1, -1)
    mask = _row_mask(batch, value)
    return rows[mask] if mask is not None else rows


class StatsCollector:
    """Accumulates the requested statistics value by value, as each value is computed.

    Whole-graph calibration feeds it from the graph's probes; the block pipeline
    (`qpass.pipeline`) feeds it block by block, finishing each block's values before the next
    block runs. Each value's sampling seed depends only on its place in `requests`, so both
    routes sample the same rows from the same data.
    """

    def __init__(self, requests: Sequence[StatRequest], *, max_samples: int = 512, seed: int = 0) -> None:
        merged: dict[str, frozenset[StatKind]] = {}
        self._where: dict[str, tuple[str, int]] = {}  # stat key -> (value name, channel axis)
        for r in requests:
            merged[r.key] = merged.get(r.key, frozenset()) | r.kinds
            self._where[r.key] = (r.value.name, r.channel_axis)
        self._accs = {
            key: _Accumulator(key, kinds, max_samples, seed + i) for i, (key, kinds) in enumerate(merged.items())
        }

    @property
    def names(self) -> list[str]:
        """The values to observe (a value may carry several keys: one per channel axis)."""
        return list(dict.fromkeys(name for name, _ in self._where.values()))

    def update(self, name: str, value: torch.Tensor, batch: Any = None, where: str = "") -> None:
        """Add one batch's `value` to each statistic kept on it (masked rows dropped: `as_rows`;
        a channel axis other than the last is moved last, and the mask then no longer applies).
        """
        for key, (vname, axis) in self._where.items():
            if vname != name:
                continue
            if axis == -1:
                self._accs[key].update(as_rows(value, batch), where)
            else:
                self._accs[key].update(as_rows(value.movedim(axis, -1)), where)

    def finish(self, names: Iterable[str] | None = None) -> Stats:
        """The statistics of the values `names` (all by default); each must have seen rows."""
        wanted = None if names is None else set(names)
        out = Stats()
        for key, (vname, _) in self._where.items():
            if wanted is not None and vname not in wanted:
                continue
            st = self._accs[key].finish()
            if st is None:
                msg = f"calibration saw no rows for '{key}' (all masked out?)"
                raise CalibrationError(msg)
            out.values[key] = st
        return out


def calibrate(
    view: GraphView,
    batches: Iterable[Any],
    requests: Sequence[StatRequest],
    *,
    max_samples: int = 512,
    seed: int = 0,
    progress: bool = True,
    desc: str = "calibrating",
) -> Stats:
    """Run every batch once and accumulate the requested statistics."""
    collector = StatsCollector(requests, max_samples=max_samples, seed=seed)
    if not collector.names:
        return Stats()
    values = [ValueRef(n) for n in collector.names]
    batches = list(batches) if not isinstance(batches, Sequence) else batches
    if len(batches) == 0:
        msg = "calibration data is empty: at least one batch is needed"
        raise CalibrationError(msg)
    bar = tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False)
    stream = view.observe_stream(values, batches)
    try:
        for i, (batch, observed) in enumerate(zip(bar, stream, strict=True)):
            for name in collector.names:
                collector.update(name, observed[name], batch, f"batch {i}, ")
    finally:
        stream.close()  # adapters remove their probes here
    return collector.finish()
