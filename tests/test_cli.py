"""The real `qpass` CLI in a subprocess: success writes a model stock onnxruntime runs; every bad
input fails with exit 1 and a one-line cause naming the file, input or key; the input is never touched.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest


def _qpass(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "qpass", *args], capture_output=True, text=True, timeout=300)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(bert_case, onnx_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = bert_case.onnx_path(onnx_dir)
    calib = folder / "calib.npz"
    np.savez(calib, **bert_case.onnx_calib())
    return model, calib, folder


def test_quantize_writes_a_runnable_model(files, bert_case):
    model, calib, folder = files
    before = _sha(model)
    out = folder / "q.onnx"
    proc = _qpass(
        "quantize", str(model), "-o", str(out), "--recipe", "w8a8-smooth", "--calib", str(calib), "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert _sha(model) == before
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = bert_case.onnx_feed(bert_case.batches[-1])
    y = sess.run(None, x)[0]
    ref = bert_case.reference(bert_case.batches[-1]).numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05
    assert not list(folder.glob(".*tmp"))  # no temp file left behind


def test_verbose_run_reports_the_passes(files):
    model, calib, folder = files
    proc = _qpass(
        "quantize", str(model), "-o", str(folder / "v.onnx"), "--recipe", "w8a8-smooth", "--calib", str(calib)
    )
    assert proc.returncode == 0, proc.stderr
    assert "smooth_quant: 3 sites, 7 skipped" in proc.stderr and "verified: max rel err" in proc.stderr
    assert "calibrating on 16 samples" in proc.stderr


def _bad_calib(folder, name, **arrays):
    path = folder / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("case_name", "message"),
    [
        ("missing_model", "nope.onnx: no such ONNX file"),
        ("corrupt_model", "corrupt.onnx: not a readable ONNX model"),
        ("unknown_recipe", "unknown recipe 'w9a9'"),
        ("wrong_input_names", "do not match the model inputs.*missing 'x'; unknown 'tokens'"),
        ("nan_calib", "nan.npz: input 'x' contains NaN \\(first at index \\(0, 0, 0\\)\\)"),
        ("wrong_rank", "input 'x' has shape \\(4, 64\\), the model expects rank 3"),
        ("output_is_input", "the output path is the input model"),
        ("missing_out_dir", "output folder .* does not exist"),
        ("missing_calib", "no such calibration file"),
    ],
)
def test_bad_input_is_one_clear_line(files, bert_case, case_name, message):
    model, calib, folder = files
    src, out, recipe, cal = str(model), str(folder / f"{case_name}.onnx"), "w8a8", str(calib)
    good = bert_case.onnx_calib()
    if case_name == "missing_model":
        src = str(folder / "nope.onnx")
    elif case_name == "corrupt_model":
        bad = folder / "corrupt.onnx"
        bad.write_bytes(model.read_bytes()[:1000])
        src = str(bad)
    elif case_name == "unknown_recipe":
        recipe = "w9a9"
    elif case_name == "wrong_input_names":
        cal = str(_bad_calib(folder, "names.npz", tokens=good["x"], mask=good["mask"]))
    elif case_name == "nan_calib":
        x = good["x"].copy()
        x[0, 0, 0] = np.nan
        cal = str(_bad_calib(folder, "nan.npz", x=x, mask=good["mask"]))
    elif case_name == "wrong_rank":
        cal = str(
            _bad_calib(
                folder, "rank.npz", x=good["x"][:, 0, : 4 * 16].reshape(-1, 64)[:4], mask=good["mask"][:4]
            )
        )
    elif case_name == "output_is_input":
        out = src
    elif case_name == "missing_out_dir":
        out = str(folder / "no" / "such" / "dir" / "q.onnx")
    elif case_name == "missing_calib":
        cal = str(folder / "absent.npz")
    before = _sha(model)
    proc = _qpass("quantize", src, "-o", out, "--recipe", recipe, "--calib", cal)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()  # progress messages, then the one-line cause
    errors = [line for line in err if line.startswith("qpass: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], proc.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    assert _sha(model) == before


def test_usage_error_exit_code():
    proc = _qpass("quantize", "model.onnx")
    assert proc.returncode == 2


def test_recipes_listing_and_show(tmp_path):
    proc = _qpass("recipes")
    assert proc.returncode == 0 and "w8a8-smooth" in proc.stdout
    shown = _qpass("recipes", "show", "w8a8-smooth")
    assert shown.returncode == 0
    path = tmp_path / "r.yaml"
    path.write_text(shown.stdout)
    from qpass.recipe import get_recipe

    assert get_recipe(str(path)) == get_recipe("w8a8-smooth")
