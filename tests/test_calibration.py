"""Calibration statistics are exact, honour padding masks, round-trip through files, and refuse bad data."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qpass.calibration import StatKind, StatRequest, Stats, calibrate
from qpass.errors import CalibrationError
from qpass.graph.view import iter_linear_ops

ALL = frozenset(StatKind)


def _first_input(view):
    return view.linear_input(next(iter(iter_linear_ops(view))))


def test_stats_match_direct_computation(case, backend, onnx_dir):
    view = case.view(backend, onnx_dir)
    batches = case.batches_for(backend)
    value = _first_input(view)
    stats = calibrate(view, batches, [StatRequest(value, ALL)], max_samples=10_000, progress=False)[value]
    rows = []
    for b in batches:
        x = view.observe([value], b)[value.name]
        flat = x.reshape(-1, x.shape[-1])
        mask = b.get("mask") if isinstance(b, dict) else None
        if mask is not None:
            flat = flat[torch.as_tensor(np.asarray(mask)).reshape(-1) != 0]
        rows.append(flat)
    x = torch.cat(rows).to(torch.float64)
    torch.testing.assert_close(stats.absmax.double(), x.abs().amax(0))
    torch.testing.assert_close(stats.min.double(), x.amin(0))
    torch.testing.assert_close(stats.max.double(), x.amax(0))
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.var, x.var(0, unbiased=False))
    torch.testing.assert_close(stats.xtx, x.T @ x)
    assert stats.count == x.shape[0]
    assert stats.samples.shape == x.shape  # fewer rows than max_samples: all kept


def test_padding_rows_are_ignored(bert_case, backend, onnx_dir):
    """Row 0 of each batch is half padding; poison its padded tokens and the ranges must not move."""
    view = bert_case.view(backend, onnx_dir)
    value = _first_input(view)
    batches = bert_case.batches_for(backend)
    clean = calibrate(view, batches, [StatRequest(value)], progress=False)[value]
    poisoned = []
    for b in batches:
        b = dict(b)
        x = b["x"].clone() if isinstance(b["x"], torch.Tensor) else b["x"].copy()
        x[0, 8:] = 1e4  # masked-out positions
        b["x"] = x
        poisoned.append(b)
    stats = calibrate(view, poisoned, [StatRequest(value)], progress=False)[value]
    torch.testing.assert_close(stats.absmax, clean.absmax)


def test_reservoir_keeps_a_bounded_uniform_sample(llama_case):
    view = llama_case.view("fx", None)
    value = _first_input(view)
    st = calibrate(
        view,
        llama_case.batches,
        [StatRequest(value, frozenset({StatKind.SAMPLES}))],
        max_samples=40,
        progress=False,
    )[value]
    assert st.samples.shape == (40, st.channels)
    seen = torch.cat(
        [view.observe([value], b)[value.name].reshape(-1, st.channels) for b in llama_case.batches]
    )
    # every sampled row is a real row of the stream, and rows beyond the first 40 were drawn too
    idx = [int(torch.nonzero((seen == r).all(1))[0]) for r in st.samples]
    assert max(idx) >= 40


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(llama_case, tmp_path, suffix):
    view = llama_case.view("fx", None)
    value = _first_input(view)
    stats = calibrate(view, llama_case.batches, [StatRequest(value, ALL)], progress=False)
    path = tmp_path / f"stats{suffix}"
    stats.save(path)
    loaded = Stats.load(path)
    a, b = stats[value], loaded[value]
    for f in ("absmax", "min", "max", "sum", "sumsq", "xtx", "samples"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert a.count == b.count


def test_nan_in_activations_is_named(llama_case):
    view = llama_case.view("fx", None)
    value = _first_input(view)
    bad = llama_case.batches[0].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=rf"produced NaN at '{re.escape(value.name)}' \(batch 0, row 0\)"):
        calibrate(view, [bad], [StatRequest(value)], progress=False)


def test_empty_calibration_and_missing_stats(llama_case, tmp_path):
    view = llama_case.view("fx", None)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(view, [], [StatRequest(_first_input(view))], progress=False)
    with pytest.raises(CalibrationError, match="no calibration statistics for value 'nope'"):
        Stats()["nope"]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="junk.npz: unreadable statistics file"):
        Stats.load(tmp_path / "junk.npz")
