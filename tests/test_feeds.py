"""Explicit calibration feeds (issue 22, parts 1-3), end to end through the API and the CLI.

The model is built here: attention over `x * gamma` with a float additive mask that holds -inf,
a scalar `temperature` and a `memory` input whose leading size is not the batch. None of these
inputs share axis 0, so the data is fed as is. Statistics ignore the mask's -inf, a static W8A8
model stays finite and close to FP, NaN is refused naming the input and its first index, and
every equivalent pass is verified on every feed.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import MEM, MaskedAttention

import qpass
from qpass.calibration import StatKind, StatRequest, calibrate
from qpass.data import Batches, onnx_batches, verification_feeds
from qpass.errors import CalibrationError, PassError
from qpass.graph.edits import EditPlan, ScaleChannels
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.onnx_load import load_model
from qpass.graph.refs import ValueRef
from qpass.graph.view import iter_linear_ops
from qpass.pass_base import PassContext, QPass
from qpass.pass_manager import max_relative_error, run_pass

INPUTS = ("x", "attn_mask", "gamma", "temperature", "memory")
DIM = 16


def feed(batch: int, seq: int, seed: int, valid: int | None = None) -> dict[str, np.ndarray]:
    """One complete feed: the last `seq - valid` keys masked with -inf for every query."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, seq, seq), np.float32)
    mask[:, :, valid if valid is not None else seq - 2 :] = -np.inf
    return {
        "x": rng.standard_normal((batch, seq, DIM)).astype(np.float32),
        "attn_mask": mask,
        "gamma": (0.5 + rng.random(DIM)).astype(np.float32),
        "temperature": np.array(2.0 + seed, np.float32),
        "memory": rng.standard_normal((MEM, DIM)).astype(np.float32),
    }


FEEDS = [feed(2, 6, 0), feed(3, 4, 1), feed(1, 7, 2, valid=3)]  # leading sizes differ within each


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The module exported by the legacy exporter with dynamic batch and sequence axes."""
    module = MaskedAttention().eval()
    example = tuple(torch.from_numpy(FEEDS[0][n]) for n in INPUTS)
    buf = io.BytesIO()
    dyn = {"x": {0: "b", 1: "s"}, "attn_mask": {0: "b", 1: "s", 2: "t"}}
    torch.onnx.export(module, example, buf, input_names=list(INPUTS), dynamic_axes=dyn, dynamo=False)
    path = tmp_path_factory.mktemp("feeds") / "masked_attention.onnx"
    path.write_bytes(buf.getvalue())
    return path


def _run(model, data: dict) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, data)[0]


def _close_to_fp(q, model_path, feeds, bound: float = 0.05) -> None:
    for data in feeds:
        got, ref = _run(q, data), _run(model_path, data)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < bound


def test_feeds_run_as_is_and_are_all_verified(model_path):
    view = OnnxGraphView(load_model(model_path))
    batches = onnx_batches(view.model, qpass.Feeds(FEEDS), batch_size=1)
    assert len(batches) == 3 and len(verification_feeds(batches)) == 3
    for got, want in zip(batches, FEEDS, strict=True):
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smooth"])
def test_static_w8a8_on_explicit_feeds_is_finite_and_close(model_path, recipe):
    result = qpass.quantize_with_report(str(model_path), recipe, qpass.Feeds(FEEDS))
    assert result.report.results[-1].plan.edits  # the linears were quantized
    _close_to_fp(result.model, model_path, FEEDS)


def test_a_mapping_without_a_shared_batch_axis_is_one_feed(model_path):
    """A plain mapping holding a scalar and inputs of different leading sizes: run as is."""
    view = OnnxGraphView(load_model(model_path))
    batches = onnx_batches(view.model, FEEDS[1], batch_size=1)
    assert len(batches) == 1 and batches[0]["memory"].shape == (MEM, DIM)
    q = qpass.quantize(str(model_path), "w8a8", [FEEDS[0], FEEDS[1]])
    _close_to_fp(q, model_path, FEEDS[:2])


def test_sample_sets_still_split_on_axis_0():
    x = np.random.default_rng(0).standard_normal((20, 4, DIM)).astype(np.float32)
    model = _single_linear()
    batches = onnx_batches(model, {"x": x}, batch_size=8)
    assert [b["x"].shape[0] for b in batches] == [8, 8, 4]
    assert len(verification_feeds(batches)) == 1


def _single_linear():
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [DIM, DIM], np.eye(DIM, dtype=np.float32).ravel())
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", DIM])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", DIM])
    proto = helper.make_model(
        helper.make_graph([node], "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    return OnnxGraphView(load_model(proto)).model


def test_nan_is_refused_naming_the_input_and_index(model_path):
    bad = dict(FEEDS[1], gamma=FEEDS[1]["gamma"].copy())
    bad["gamma"][3] = np.nan
    with pytest.raises(
        CalibrationError, match=r"^feed 1: input 'gamma' contains NaN \(first at index \(3,\)\)$"
    ):
        qpass.quantize(str(model_path), "w8a8", qpass.Feeds([FEEDS[0], bad]))
    scalar = dict(FEEDS[0], temperature=np.array(np.nan, np.float32))
    with pytest.raises(CalibrationError, match=r"input 'temperature' contains NaN \(first at index \(\)\)"):
        qpass.quantize(str(model_path), "w8a8", scalar)


def test_statistics_ignore_the_masks_infinite_entries(model_path):
    """The masked scores hold -inf: ranges, absmax, moments, X^T X and samples use finite entries only."""
    proto = onnx.load(model_path)
    add = next(n for n in proto.graph.node if n.op_type == "Add" and "attn_mask" in n.input)
    view = OnnxGraphView(load_model(model_path))
    value = ValueRef(add.output[0])
    feeds = [FEEDS[0], feed(3, 6, 4, valid=3)]  # one key width (6) in both
    st = calibrate(view, feeds, [StatRequest(value, frozenset(StatKind))], progress=False)[value]
    x = torch.cat([view.observe([value], f)[value.name].reshape(-1, 6) for f in feeds]).to(torch.float64)
    fin = torch.isfinite(x)
    assert not fin.all()  # the value really carries the mask
    for t in (st.absmax, st.min, st.max, st.mean, st.var, st.xtx, st.samples):
        assert torch.isfinite(t).all()
    clean = torch.where(fin, x, 0.0)
    torch.testing.assert_close(st.absmax.double(), clean.abs().amax(0))
    torch.testing.assert_close(st.max.double()[:4], torch.where(fin, x, -torch.inf).amax(0)[:4])
    torch.testing.assert_close(st.min.double()[:4], torch.where(fin, x, torch.inf).amin(0)[:4])
    torch.testing.assert_close(st.mean[:4], clean.sum(0)[:4] / fin.sum(0)[:4])
    torch.testing.assert_close(st.xtx, clean.T @ clean)
    assert st.samples.shape == x.shape
    assert (st.min[4:] == 0).all() and (st.max[4:] == 0).all()  # masked in every feed: no finite entry


class ScaleFirstWeight(QPass):
    """Claims to be equivalent but scales the first linear's input columns: visible only where x != 0."""

    name = "scale_first_weight"

    def stat_requests(self, view, ctx):
        return []

    def plan(self, view, stats, ctx):
        op = next(iter(iter_linear_ops(view)))
        w = view.weight(op)
        factors = torch.full((w.in_features,), 1.01)
        return EditPlan(self.name, [ScaleChannels(w.const, w.in_axis, factors, site=op.name)])


def test_every_feed_is_verified_with_the_same_tolerance(model_path):
    """Feed 0 has x = 0 (the edit is invisible on it); the failure shows on feed 1 and is named."""
    zero = dict(FEEDS[0], x=np.zeros_like(FEEDS[0]["x"]))
    view = OnnxGraphView(load_model(model_path))
    feeds = onnx_batches(view.model, qpass.Feeds([zero, FEEDS[1]]))
    with pytest.raises(PassError, match=r"scale_first_weight.*on verification feed 1 of 2"):
        run_pass(view, ScaleFirstWeight(None), feeds, PassContext())
    view = OnnxGraphView(load_model(model_path))  # only the first batch of split data: not caught
    run_pass(view, ScaleFirstWeight(None), Batches([zero, FEEDS[1]]), PassContext())


def test_infinite_outputs_compare_equal_when_they_match():
    b = torch.tensor([1.0, -torch.inf, 2.0, torch.nan])
    assert max_relative_error([b], [b.clone()]) == 0.0
    assert max_relative_error([b], [torch.tensor([1.0, torch.inf, 2.0, torch.nan])]) == float("inf")
    assert max_relative_error([b], [torch.tensor([1.0, -torch.inf, 2.2, torch.nan])]) == pytest.approx(0.1)


def test_torch_module_with_explicit_feeds():
    module = MaskedAttention().eval()
    feeds = [{n: torch.from_numpy(f[n]) for n in INPUTS} for f in (FEEDS[0], feed(2, 6, 3))]
    q = qpass.quantize(module, "w8a8", qpass.Feeds(feeds))
    for f in feeds:
        got, ref = q(**f), module(**f)
        assert torch.isfinite(got).all() and float((got - ref).norm() / ref.norm()) < 0.05
    bad = dict(feeds[1], memory=feeds[1]["memory"].clone())
    bad["memory"][2, 4] = torch.nan
    with pytest.raises(
        CalibrationError, match=r"feed 1 input 'memory' contains NaN \(first at index \(2, 4\)\)"
    ):
        qpass.quantize(module, "w8a8", qpass.Feeds([feeds[0], bad]))


# ----------------------------------------------------------------------------- CLI
def _qpass(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "qpass", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_folder_of_feeds(model_path, tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, f in enumerate(FEEDS):
        np.savez(folder / f"feed{i}.npz", **f)
    out = tmp_path / "q.onnx"
    proc = _qpass(
        "quantize",
        str(model_path),
        "-o",
        str(out),
        "--recipe",
        "w8a8-smooth",
        "--calib",
        str(folder),
        "--feeds",
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibrating on 3 feeds" in proc.stderr
    _close_to_fp(onnx.load(out), model_path, FEEDS)
    # one .npz with a scalar and inputs of different leading sizes is one feed, no flag needed
    single = tmp_path / "one.npz"
    np.savez(single, **FEEDS[2])
    proc = _qpass(
        "quantize",
        str(model_path),
        "-o",
        str(tmp_path / "q1.onnx"),
        "--recipe",
        "w8a8",
        "--calib",
        str(single),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    _close_to_fp(onnx.load(tmp_path / "q1.onnx"), model_path, FEEDS[2:])


def test_cli_nan_in_a_feed_is_one_line_naming_file_input_and_index(model_path, tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.savez(folder / "a.npz", **FEEDS[0])
    bad = dict(FEEDS[1], x=FEEDS[1]["x"].copy())
    bad["x"][2, 1, 5] = np.nan
    np.savez(folder / "b.npz", **bad)
    for flags in (["--feeds"], []):
        proc = _qpass(
            "quantize",
            str(model_path),
            "-o",
            str(tmp_path / "q.onnx"),
            "--recipe",
            "w8a8",
            "--calib",
            str(folder),
            "--quiet",
            *flags,
        )
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("qpass: error: ") and lines[0].endswith(
            "b.npz: input 'x' contains NaN (first at index (2, 1, 5))"
        ), lines[0]
    assert not (tmp_path / "q.onnx").exists()


def test_cli_torch_factory_with_feeds(tmp_path):
    """`qpass quantize cli_models:masked_attention --feeds`: each .npz one keyword batch, as is."""
    from pathlib import Path

    from qpass.registry import register_qpass_ops

    folder = tmp_path / "feeds"
    folder.mkdir()
    feeds = [feed(2, 6, 5), feed(2, 6, 6)]
    for i, f in enumerate(feeds):
        np.savez(folder / f"f{i}.npz", **f)
    out = tmp_path / "m.q.pt2"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "qpass", "quantize", "cli_models:masked_attention", "-o", str(out)]
        + ["--recipe", "w8a8", "--calib", str(folder), "--feeds"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibrating on 2 feeds" in proc.stderr
    register_qpass_ops()
    loaded = torch.export.load(str(out)).module()
    fp = MaskedAttention().eval()
    for f in feeds:
        t = {k: torch.from_numpy(v) for k, v in f.items()}
        with torch.no_grad():
            got, ref = loaded(**t), fp(**t)
        assert torch.isfinite(got).all() and float((got - ref).norm() / ref.norm()) < 0.05
