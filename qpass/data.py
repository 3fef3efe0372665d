"""Calibration data at the API edge: validated and turned into the feeds the graph adapters run.

A *feed* is one complete input mapping, run through the model as is. ONNX data is given as:

- `Feeds([...])`: **explicit feeds**, each a complete {input name: array} mapping, run as is and
  never split on axis 0. Scalars, per-channel parameters, states and inputs of different leading
  sizes are all fine. `Feeds.load(folder)` reads one feed per `.npz` file (the API also takes a
  folder path for this); the CLI's `--feeds` does the same.
- a mapping {input name: array} (e.g. an `.npz` file) or a list of them. A mapping is a set of
  samples, cut into batches of `batch_size` rows, only where that is what it is: every array has
  axis 0 of one size, and the model leaves axis 0 free (or fixes it to the same size d for every
  input: then batches of d). Any other mapping (a scalar among its arrays, inputs whose leading
  sizes differ, per-channel parameters with a fixed first dim) is one feed, run as is.

Torch data is an iterable of batches (a tensor, a tuple of positional args, or a dict of keyword
args), each run as is; wrap it in `Feeds` to verify on every one of them.

Every array is checked: names match the model inputs, dtypes and ranks fit, fixed dims match
(axis 0 too, for a feed). NaN is refused, naming the input and the index of its first NaN. ±inf
is data (a float additive attention mask holds -inf) and accepted; calibration statistics ignore
infinite entries.

The result is a `Batches` list: what calibration runs, in order, and `checks`, the feeds every
equivalent pass compares outputs on (`verification_feeds`): every feed run as is, plus the first
batch of data that was split (just the first batch when all data was split, as before).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch.utils import _pytree as pytree

from qpass.errors import CalibrationError


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an .npz file (no pickle), one per model input."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such calibration file"
        raise CalibrationError(msg)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        msg = f"{path}: not a readable .npz calibration file ({type(exc).__name__}: {exc})"
        raise CalibrationError(msg) from exc
    if not arrays:
        msg = f"{path}: the calibration file holds no arrays"
        raise CalibrationError(msg)
    return arrays


class Feeds:
    """Explicit calibration feeds: each item a complete input mapping (ONNX) or batch (torch), run as
    is with no splitting on axis 0, and verification compares outputs on every one of them.

    `origins` name each feed in errors (a file path for loaded feeds; `feed i` by default).
    `split=True` gives up the "as is": each mapping is then read like plain data (cut into batches
    where it is a sample set) and only keeps its name; the CLI passes a folder so without --feeds.
    """

    def __init__(
        self, feeds: Iterable[Any], origins: Sequence[str] | None = None, *, split: bool = False
    ) -> None:
        self.split = split
        if isinstance(feeds, (Mapping, torch.Tensor)):
            feeds = [feeds]
        self.items: tuple[Any, ...] = tuple(feeds)
        self.origins: tuple[str, ...] = (
            tuple(origins) if origins is not None else tuple(f"feed {i}" for i in range(len(self.items)))
        )
        if len(self.origins) != len(self.items):
            msg = f"Feeds: {len(self.items)} feeds but {len(self.origins)} origins"
            raise CalibrationError(msg)

    @classmethod
    def load(cls, source: str | os.PathLike) -> Feeds:
        """One feed per `.npz` of a folder (sorted by name), or the one feed of an `.npz` file."""
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
            if not files:
                msg = f"{path}: the folder holds no .npz files (one feed per file)"
                raise CalibrationError(msg)
            return cls([load_npz(p) for p in files], [str(p) for p in files])
        return cls([load_npz(path)], [str(path)])

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __repr__(self) -> str:
        return f"Feeds({len(self.items)} feeds)"


class Batches(list):
    """The batches calibration runs, in order; `checks` are the feeds verification runs."""

    def __init__(self, batches: Iterable[Any] = (), checks: Iterable[Any] | None = None) -> None:
        super().__init__(batches)
        self.checks = list(checks) if checks is not None else list(self[:1])


def verification_feeds(batches: Sequence[Any]) -> list[Any]:
    """What an equivalent pass is verified on: a `Batches`' checks, else the first batch."""
    checks = batches.checks if isinstance(batches, Batches) else []
    return list(checks) if checks else list(batches[:1])


def leading_size(arrays: Mapping[str, Any]) -> int | None:
    """The axis-0 size every array shares, or None (a scalar among them, or sizes that differ)."""
    sizes = set()
    for a in arrays.values():
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) == 0:
            return None
        sizes.add(int(shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def split_rows(arrays: Mapping[str, Any], step: int) -> list[dict]:
    """Batches of `step` rows of arrays that share axis 0 (one batch as is when they do not)."""
    n = leading_size(arrays)
    if n is None or n == 0:
        return [dict(arrays)]
    return [{k: a[s : s + step] for k, a in arrays.items()} for s in range(0, n, step)]


_NP_OF_IR = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
}


def _entries(data: Any, origin: str) -> list[tuple[Mapping, str, bool]]:
    """(mapping, its name in errors, whether it is an explicit feed) for each piece of data."""
    if isinstance(data, Feeds):
        return [(d, o, not data.split) for d, o in zip(data.items, data.origins, strict=True)]
    if isinstance(data, (str, os.PathLike)):
        if Path(data).is_dir():
            return _entries(Feeds.load(data), origin)
        return [(load_npz(data), str(data), False)]
    if isinstance(data, Mapping):
        return [(data, origin, False)]
    if isinstance(data, Sequence) and all(isinstance(d, Mapping) for d in data):
        many = len(data) > 1
        return [(d, f"{origin}[{i}]" if many else origin, False) for i, d in enumerate(data)]
    msg = f"{origin}: expected a mapping of input name -> array, a list of them, or Feeds; got {type(data).__name__}"
    raise CalibrationError(msg)


def _split_step(
    arrays: Mapping[str, np.ndarray], inputs: Mapping[str, ir.Value], batch_size: int
) -> int | None:
    """Rows per batch when the mapping is a set of samples on axis 0, None when it is one feed."""
    if leading_size(arrays) is None:
        return None
    fixed = [v.shape[0] if v.shape is not None and len(v.shape) else None for v in inputs.values()]
    fixed = [d if isinstance(d, int) else None for d in fixed]
    if all(d is None for d in fixed):
        return batch_size
    if len(set(fixed)) == 1 and leading_size(arrays) % fixed[0] == 0:  # every input fixes axis 0 to d
        return fixed[0]
    return None


def onnx_batches(
    model: ir.Model, data: Any, batch_size: int = 8, origin: str = "calibration data"
) -> Batches:
    """Validate data against the model's inputs; split sample sets into batches, keep feeds as is."""
    entries = _entries(data, origin)
    if not entries:
        msg = f"{origin}: calibration data is empty"
        raise CalibrationError(msg)
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    batches, feeds, split_first = [], [], []
    for chunk, where, explicit in entries:
        if not isinstance(chunk, Mapping):
            msg = f"{where}: expected a mapping of input name -> array, got {type(chunk).__name__}"
            raise CalibrationError(msg)
        missing = sorted(set(inputs) - set(chunk))
        extra = sorted(set(chunk) - set(inputs))
        if missing or extra:
            problems = [f"missing '{m}'" for m in missing] + [f"unknown '{e}'" for e in extra]
            msg = (
                f"{where}: arrays {sorted(chunk)} do not match the model inputs {sorted(inputs)} "
                f"({'; '.join(problems)})"
            )
            raise CalibrationError(msg)
        raw = {name: np.asarray(chunk[name]) for name in inputs}
        step = None if explicit else _split_step(raw, inputs, batch_size)
        arrays = {name: _check_array(raw[name], inputs[name], where, step is not None) for name in inputs}
        if step is None:
            batches.append(arrays)
            feeds.append(arrays)
            continue
        if leading_size(arrays) == 0:
            msg = f"{where}: calibration data has 0 samples"
            raise CalibrationError(msg)
        rows = split_rows(arrays, step)
        split_first.append(rows[0])
        batches += rows
    return Batches(batches, feeds + split_first[:1])


def _check_array(arr: np.ndarray, value: ir.Value, origin: str, batched: bool) -> np.ndarray:
    name = value.name
    want = _NP_OF_IR.get(value.dtype) if value.dtype is not None else None
    if value.dtype == ir.DataType.STRING:  # text inputs (tokenizer ops, label encoders): data as is
        if arr.dtype == object or arr.dtype.kind in "US":
            return arr.astype(object)
        msg = f"{origin}: input '{name}' has dtype {arr.dtype}, the model expects strings"
        raise CalibrationError(msg)
    if arr.dtype == object or arr.dtype.kind in "USV":
        msg = f"{origin}: input '{name}' has dtype {arr.dtype}, expected a numeric array"
        raise CalibrationError(msg)
    if want is not None and arr.dtype != want:
        if np.issubdtype(arr.dtype, np.floating) != np.issubdtype(want, np.floating):
            msg = f"{origin}: input '{name}' has dtype {arr.dtype}, the model expects {np.dtype(want).name}"
            raise CalibrationError(msg)
        arr = arr.astype(want)
    if value.shape is not None and arr.ndim != len(value.shape):
        msg = f"{origin}: input '{name}' has shape {arr.shape}, the model expects rank {len(value.shape)} {value.shape}"
        raise CalibrationError(msg)
    if value.shape is not None:
        for axis, (got, dim) in enumerate(zip(arr.shape, value.shape, strict=True)):
            if isinstance(dim, int) and (axis > 0 or not batched) and got != dim:
                msg = f"{origin}: input '{name}' has shape {arr.shape}, the model expects {value.shape}"
                raise CalibrationError(msg)
    if np.issubdtype(arr.dtype, np.floating):
        check_no_nan(arr, f"{origin}: input '{name}'")
    return arr


def check_no_nan(arr: np.ndarray | torch.Tensor, what: str) -> None:
    """Refuse NaN, naming `what` and the index of the first NaN; ±inf passes (it is data)."""
    nan = torch.isnan(arr) if isinstance(arr, torch.Tensor) else np.isnan(arr)
    if not nan.any():
        return
    flat = int(nan.reshape(-1).int().argmax()) if isinstance(nan, torch.Tensor) else int(nan.argmax())
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(arr.shape)))
    msg = f"{what} contains NaN (first at index {index})"
    raise CalibrationError(msg)


def _leaf_name(path: tuple) -> str:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return f"input '{'.'.join(keys)}'" if keys else "input"


def torch_batches(data: Iterable[Any] | None, origin: str = "calibration data") -> Batches:
    """Materialise torch calibration batches (each run as is) and refuse NaN in any tensor."""
    if data is None:
        msg = f"{origin}: calibration data is required"
        raise CalibrationError(msg)
    explicit = isinstance(data, Feeds) and not data.split
    names = list(data.origins) if isinstance(data, Feeds) else None
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    batches = list(data)
    if not batches:
        msg = f"{origin}: calibration data is empty"
        raise CalibrationError(msg)
    for i, batch in enumerate(batches):
        where = f"{origin}: {names[i]}" if names else f"{origin}: batch {i}"
        for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                check_no_nan(leaf, f"{where} {_leaf_name(path)}")
    return Batches(batches, batches if explicit else None)
