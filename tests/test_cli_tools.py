"""The real `qpass` CLI in a subprocess on small models: inspect (HTML/PNG/JSON against numbers the
library computes), quantize of a torch `module:factory` to a loadable .pt2, eval (cosine, top-1,
perplexity against numbers computed here), data formats, and every --help.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from qpass.api import open_view
from qpass.calibration import StatRequest, calibrate
from qpass.cli import main
from qpass.data import onnx_batches
from qpass.graph.view import iter_linear_ops
from qpass.pass_base import PassContext
from qpass.pass_manager import run_passes
from qpass.quant.qlinear import canonical_weight
from qpass.recipe import get_recipe

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def qpass_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m qpass ARGS` importing this checkout (and tests/, for the `cli_models` factories)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-P", "-m", "qpass", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def layer_numbers(view, batches) -> dict[str, dict[str, np.ndarray]]:
    """Per linear op: activation absmax (calibrated here) and weight absmax per input channel."""
    ops = list(iter_linear_ops(view))
    stats = calibrate(view, batches, [StatRequest(view.linear_input(op)) for op in ops], progress=False)
    out = {}
    for op in ops:
        ref = view.weight(op)
        w = canonical_weight(view.read(ref.const), ref)
        out[op.name] = {
            "act": stats[view.linear_input(op)].absmax.double().numpy(),
            "weight": w.abs().amax(0).double().numpy(),
        }
    return out


def pearson_kurtosis(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean()
    return float((c**4).mean() / (c**2).mean() ** 2)


def check_html(folder: Path) -> list[str]:
    """report.html exists and every image it references is a valid PNG in the folder."""
    page = (folder / "report.html").read_text()
    pngs = re.findall(r"<img src='([^']+)'", page)
    assert pngs and all(p.endswith(".png") for p in pngs)
    for name in pngs:
        path = folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as im:
            im.verify()
            assert im.size[0] > 200 and im.size[1] > 100
    return pngs


@pytest.fixture(scope="module")
def bert_files(bert_case, onnx_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_tools")
    model = bert_case.onnx_path(onnx_dir)
    calib = folder / "calib.npz"
    np.savez(calib, **bert_case.onnx_calib())
    return model, calib, folder


def test_inspect_report_matches_the_library(bert_files):
    model, calib, folder = bert_files
    out = folder / "inspect"
    proc = qpass_cli(
        "inspect", str(model), "--calib", str(calib), "--recipe", "w8a8-smooth", "--report", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibrating on 16 samples" in proc.stderr and "smooth_quant: 3 sites" in proc.stderr
    pngs = check_html(out)
    doc = json.loads((out / "report.json").read_text())
    widths = {layer["in_features"] for layer in doc["layers"]}
    assert len(pngs) == len(doc["layers"]) + 1 + len(widths)  # per layer, the overview, a heatmap per width

    view = open_view(str(model))
    batches = onnx_batches(view.model, str(calib), 8)
    before = layer_numbers(view, batches)
    recipe = get_recipe("w8a8-smooth")
    run_passes(
        view, [s.build() for s in recipe.passes], batches, PassContext(recipe.weights, recipe.activations)
    )
    after = layer_numbers(view, batches)
    assert [layer["op"] for layer in doc["layers"]] == list(before)
    for layer in doc["layers"]:
        for when, numbers in (("before", before), ("after", after)):
            for kind in ("act", "weight"):
                got = layer[when][kind]
                want = numbers[layer["op"]][kind]
                np.testing.assert_allclose(got["absmax"], want, rtol=1e-6)
                assert got["max"] == pytest.approx(want.max(), rel=1e-6)
                assert got["kurtosis"] == pytest.approx(pearson_kurtosis(want), rel=1e-6)
                flagged = np.nonzero(want >= doc["outlier_ratio"] * np.median(want))[0]
                assert got["outlier_count"] == len(flagged)
                assert {o["channel"] for o in got["outliers"]} <= set(flagged.tolist())

    # the injected outlier channels (3, 17 of every norm output) are found and shared across layers
    shared = {(s["channel"], s["width"]) for s in doc["shared_outliers"]["before"]}
    assert {(3, 64), (17, 64)} <= shared
    # where smoothing applies, the outlier channels flatten: max/median and kurtosis fall
    changed = [
        layer
        for layer in doc["layers"]
        if not np.allclose(layer["before"]["act"]["absmax"], layer["after"]["act"]["absmax"], rtol=1e-5)
    ]
    assert len(changed) == 3
    for layer in changed:
        assert layer["changed"]
        assert layer["after"]["act"]["max_ratio"] < 0.9 * layer["before"]["act"]["max_ratio"]
        assert layer["after"]["act"]["kurtosis"] < layer["before"]["act"]["kurtosis"]
    # the one smoothed site that carried the injected channels: 1500x the median before, < 50x after
    (worst,) = [layer for layer in changed if layer["before"]["act"]["outlier_count"]]
    assert worst["before"]["act"]["max_ratio"] > 1000 and worst["after"]["act"]["max_ratio"] < 50


def test_quantize_torch_factory_round_trip(bert_files, bert_case):
    _, calib, folder = bert_files
    out = folder / "tiny_bert.q.pt2"
    proc = qpass_cli(
        "quantize", "cli_models:tiny_bert", "-o", str(out), "--recipe", "w8a8-smooth", "--calib", str(calib),
        "--input", "x:2x16x64", "--input", "mask:2x16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "smooth_quant: 3 sites" in proc.stderr and "quantize: 14 sites" in proc.stderr
    # the recipe travels with the model and is a valid --recipe file
    saved = out.with_name("tiny_bert.q.recipe.yaml")
    assert get_recipe(str(saved)) == get_recipe("w8a8-smooth")

    # the saved program loads back and runs other batch sizes; it matches an in-process quantize
    loaded = _load_pt2(out)
    import cli_models

    import qpass

    fp = cli_models.tiny_bert()
    batches = [
        dict(zip(("x", "mask"), (torch.from_numpy(a) for a in arrs), strict=True)) for arrs in _rows(calib)
    ]
    inproc = qpass.quantize(fp, "w8a8-smooth", calibration=batches, example_inputs=batches[0])
    test = {k: v[:3] for k, v in bert_case.batches[-1].items()}
    with torch.no_grad():
        got, want, ref = loaded(**test), inproc(**test), fp(**test)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - ref).norm() / ref.norm()) < 0.05


def _rows(calib: Path, batch: int = 8):
    with np.load(calib) as z:
        x, m = z["x"], z["mask"]
    return [(x[i : i + batch], m[i : i + batch]) for i in range(0, len(x), batch)]


def test_eval_lm_perplexity_and_top1(tmp_path):
    gen = np.random.default_rng(0)
    ids = gen.integers(0, 97, size=(12, 10)).astype(np.int64)
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=ids)
    out = tmp_path / "lm.q.pt2"
    proc = qpass_cli(
        "quantize", "cli_models:tiny_lm", "-o", str(out), "--recipe", "w8a8", "--calib", str(data), "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet
    proc = qpass_cli("eval", "cli_models:tiny_lm", str(out), "--data", str(data), "--task", "lm", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)

    import cli_models

    fp, q = cli_models.tiny_lm(), _load_pt2(out)
    x = torch.from_numpy(ids)
    with torch.no_grad():
        lf, lq = fp(x).double(), q(input_ids=x).double()

    def ppl(logits):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
        return float(torch.exp(nll))

    assert doc["samples"] == 12 and doc["task"] == "lm"
    assert doc["perplexity_fp"] == pytest.approx(ppl(lf), rel=1e-5)
    assert doc["perplexity_quant"] == pytest.approx(ppl(lq), rel=1e-5)
    (o,) = doc["outputs"]
    assert o["top1_agreement"] == pytest.approx(float((lf.argmax(-1) == lq.argmax(-1)).double().mean()))
    a, b = lf.reshape(12, -1), lq.reshape(12, -1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert o["cosine_mean"] == pytest.approx(float(cos.mean()), rel=1e-6)
    assert o["cosine_min"] == pytest.approx(float(cos.min()), rel=1e-6)
    assert o["rel_error"] == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-6)
    assert 0.5 < o["top1_agreement"] <= 1.0 and o["rel_error"] > 0  # quantized, not a copy


def test_eval_onnx_folder_of_npy_masks_padding(bert_files, bert_case, tmp_path):
    model, calib, folder = bert_files
    q, report = folder / "q_eval.onnx", folder / "qreport"
    proc = qpass_cli(
        "quantize",
        str(model),
        "-o",
        str(q),
        "--recipe",
        "w8a8-smooth",
        "--calib",
        str(calib),
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    passes = json.loads((report / "passes.json").read_text())
    assert [p["pass"] for p in passes["passes"]] == ["smooth_quant", "quantize"]
    assert passes["passes"][0]["max_rel_error"] < 1e-4
    assert sum(site["applied"] for site in passes["passes"][0]["sites"]) == 3
    check_html(report)
    data = tmp_path / "data"
    data.mkdir()
    feeds = bert_case.onnx_calib()
    for name, arr in feeds.items():
        np.save(data / f"{name}.npy", arr)
    proc = qpass_cli("eval", str(model), str(q), "--data", str(data), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    (o,) = json.loads(proc.stdout)["outputs"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s_fp = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    s_q = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
    cos = []
    for i in range(0, len(feeds["x"]), 8):
        batch = {k: v[i : i + 8] for k, v in feeds.items()}
        m = batch["mask"][..., None]  # padded positions count for nothing
        a, b = (s.run(None, batch)[0] * m for s in (s_fp, s_q))
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cos += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert o["cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-6)
    assert o["cosine_min"] == pytest.approx(np.min(cos), rel=1e-6)
    assert o["top1_agreement"] is None  # an unnamed hidden-state output is no classifier


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "model.bin", "--calib", "c.npz", "--report", "r"], "not a model qpass reads"),
        (["inspect", "nosuchpkg.mod:build", "--calib", "{calib}", "--report", "{tmp}/r"], "cannot import module"),
        (["inspect", "{model}", "--calib", "{tmp}/c.txt", "--report", "{tmp}/r"], "text data needs --tokenizer"),
        (["inspect", "{model}", "--calib", "{tmp}/empty", "--report", "{tmp}/r"], "holds no .npz or .npy"),
        (
            ["quantize", "cli_models:tiny_bert", "-o", "{tmp}/t.pt2", "--recipe", "w8a8", "--calib", "{calib}",
             "--input", "y:2x16"],
            "has no such argument; it takes \\['x', 'mask'\\]",
        ),
        (
            ["quantize", "cli_models:tiny_bert", "-o", "{tmp}/t.onnx", "--recipe", "w8a8", "--calib", "{calib}"],
            "name the output \\*.pt2",
        ),
        (["quantize", "cli_models:tiny_bert", "-o", "{tmp}/t.pt2", "--recipe", "w8a8", "--calib", "{calib}",
          "--input", "x:2by16"], "is not dims joined by 'x'"),
        (["eval", "{model}", "{tmp}/absent.onnx", "--data", "{calib}"], "absent.onnx: no such ONNX file"),
        (["inspect", "{model}", "--calib", "{calib}", "--report", "{tmp}/r", "--outlier-ratio", "0.5"], "must be > 1"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_with_one_line(bert_files, tmp_path, capsys, args, message):
    """In process (the subprocess path of errors is covered in test_cli.py): `main` returns 1 with one line."""
    model, calib, _ = bert_files
    (tmp_path / "c.txt").write_text("one sample\n")
    (tmp_path / "empty").mkdir()
    fill = {"model": str(model), "calib": str(calib), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in args]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qpass: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert re.search(message, errors[0]), errors[0]


def test_help_is_complete():
    top = qpass_cli("--help")
    assert top.returncode == 0
    for command in ("quantize", "inspect", "eval", "zoo", "recipes"):
        assert command in top.stdout
    wanted = {
        "quantize": [
            "--recipe",
            "--calib",
            "--tokenizer",
            "--input",
            "--verify",
            "--no-verify",
            "--report",
            "--quiet",
        ],
        "inspect": ["--calib", "--report", "--recipe", "--outlier-ratio", "--tokenizer", "--quiet"],
        "eval": ["--data", "--task", "--json", "--tokenizer"],
        "zoo": ["minilm", "--samples"],
        "recipes": ["show"],
    }
    for command, flags in wanted.items():
        proc = qpass_cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        for flag in flags:
            assert flag in proc.stdout, (command, flag)
    assert qpass_cli("inspect").returncode == 2  # usage error


def test_inspect_torch_factory(bert_files, tmp_path, capsys):
    """In process: a torch `module:factory` is captured with torch.export and reported like ONNX."""
    _, calib, _ = bert_files
    out = tmp_path / "report"
    assert main(["inspect", "cli_models:tiny_bert", "--calib", str(calib), "--recipe", "w8a8-smooth",
                 "--report", str(out), "--input", "x:2x16x64", "--input", "mask:2x16"]) == 0  # fmt: skip
    assert "smooth_quant: 3 sites" in capsys.readouterr().err
    check_html(out)
    doc = json.loads((out / "report.json").read_text())
    labels = [layer["label"] for layer in doc["layers"]]
    assert labels[:6] == [
        f"layers.0.{n}" for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "fc1", "fc2")
    ]
    o_proj = doc["layers"][3]
    assert o_proj["after"]["act"]["max_ratio"] < o_proj["before"]["act"]["max_ratio"]
    shared = {(s["channel"], s["width"]) for s in doc["shared_outliers"]["before"]}
    assert {(3, 64), (17, 64)} <= shared


def _load_pt2(path):
    """A saved quantized program calls qpass::* kernels: register them, then load."""
    from qpass.lowering.torch_save import register_qpass_ops

    register_qpass_ops()
    return torch.export.load(str(path)).module()
