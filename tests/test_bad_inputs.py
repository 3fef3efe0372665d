"""The bad-input corpus: each case (as data) gives one exact `QPassError` subclass whose message
names the file, node, input or key at fault, through the library and through the real CLI
(exit 1 or 2, one line on stderr, no traceback); the input model is never changed.

Also here: an op qpass does not know next to quantizable layers is skipped with a reason while
the rest is quantized, and symbolic batch/sequence dims survive quantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.api import quantize_file, quantize_with_report
from qpass.errors import (
    CalibrationError,
    ConfigError,
    ModelLoadError,
    OutputPathError,
    QPassError,
    UnsupportedOpError,
)

DIM = 16


def tiny_model(odd_op: str = "Sin", domain: str = "") -> onnx.ModelProto:
    """The model: LN1 -> mm1 and LN2 -> {mm2, odd op -> mm3} on x, summed; symbolic batch and sequence."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal(DIM) + 1).astype(np.float32), "g1"),
        numpy_helper.from_array(np.zeros(DIM, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal(DIM) + 1).astype(np.float32), "g2"),
        numpy_helper.from_array(np.zeros(DIM, np.float32), "b2"),
    ]
    for name in ("W1", "W2", "W3"):
        w = (0.3 * rng.standard_normal((DIM, DIM))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["h1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h1", "W1"], ["y1"], name="mm1"),
        helper.make_node("LayerNormalization", ["x", "g2", "b2"], ["h2"], name="ln2", axis=-1),
        helper.make_node(odd_op, ["h2"], ["s"], name="odd", domain=domain),
        helper.make_node("MatMul", ["h2", "W2"], ["y2"], name="mm2"),
        helper.make_node("MatMul", ["s", "W3"], ["y3"], name="mm3"),
        helper.make_node("Add", ["y1", "y2"], ["y12"], name="add1"),
        helper.make_node("Add", ["y12", "y3"], ["y"], name="add2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", DIM])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", DIM])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def calib_x(n: int = 8, seq: int = 4) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, seq, DIM)).astype(np.float32)


@dataclass
class Files:
    folder: Path
    model: Path
    calib: Path


@dataclass
class Call:
    """The arguments of one quantize call: src/dst paths, a recipe name or file, a calibration file."""

    src: Path
    dst: Path
    recipe: str
    calib: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    folder = tmp_path_factory.mktemp("bad_inputs")
    model = folder / "tiny.onnx"
    onnx.save(tiny_model(), model)
    calib = folder / "calib.npz"
    np.savez(calib, x=calib_x())
    return Files(folder, model, calib)


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _npz(folder: Path, name: str, **arrays) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


FIRST_BIG = tuple(int(i) for i in np.argwhere(calib_x() > 2)[0])  # where nan.npz's first NaN is


def _feed_folder(f: Files) -> Path:
    """A folder of two .npz feeds; the second holds a NaN (the API reads it as Feeds, the CLI too)."""
    folder = f.folder / "feeds"
    folder.mkdir(exist_ok=True)
    bad = calib_x(3)
    bad[1, 2, 3] = np.nan
    np.savez(folder / "a.npz", x=calib_x(2))
    np.savez(folder / "b.npz", x=bad)
    return folder


def _checker_failure(f: Files) -> Path:
    model = tiny_model()
    model.graph.node[1].input[0] = "undefined_value"  # mm1 reads a value nothing produces
    path = f.folder / "unchecked.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _custom_op(f: Files) -> Path:
    path = f.folder / "custom.onnx"
    onnx.save(tiny_model("Foo", "com.acme"), path)
    return path


def _readonly_dir(f: Files) -> Path:
    folder = f.folder / "readonly"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores mode bits; a read-only mount still stops it
        folder = Path("/proc/sys")
        if os.access(folder, os.W_OK):
            pytest.skip("no read-only folder available to this user")
    return folder / "q.onnx"


def _symlink_to_input(f: Files) -> Path:
    link = f.folder / "alias.onnx"
    if not link.exists():
        link.symlink_to(f.model)
    return link


@dataclass(frozen=True)
class BadCase:
    """One bad input: how to make it from the good files, the error class, a regex of its message."""

    name: str
    make: Callable[[Files], Call]
    error: type[QPassError]
    message: str


def _call(f: Files, **changes) -> Call:
    call = Call(f.model, f.folder / "out.onnx", "w8a8-smooth", f.calib)
    for key, value in changes.items():
        setattr(call, key, value)
    return call


CASES = [
    BadCase(
        "missing_model",
        lambda f: _call(f, src=f.folder / "nope.onnx"),
        ModelLoadError,
        r"nope\.onnx: no such ONNX file",
    ),
    BadCase(
        "truncated_model",
        lambda f: _call(f, src=_write(f.folder, "truncated.onnx", f.model.read_bytes()[:-300])),
        ModelLoadError,
        r"truncated\.onnx: not a readable ONNX model",
    ),
    BadCase(
        "corrupt_model",
        lambda f: _call(f, src=_write(f.folder, "corrupt.onnx", bytes(range(256)) * 8)),
        ModelLoadError,
        r"corrupt\.onnx: not a readable ONNX model",
    ),
    BadCase(
        "text_file_as_model",
        lambda f: _call(f, src=_write(f.folder, "notes.onnx", "this is not a model\n")),
        ModelLoadError,
        r"notes\.onnx: ",
    ),
    BadCase(
        "fails_checker",
        lambda f: _call(f, src=_checker_failure(f)),
        ModelLoadError,
        r"unchecked\.onnx: fails the ONNX checker: .*undefined_value",
    ),
    BadCase(
        "unknown_custom_op",
        lambda f: _call(f, src=_custom_op(f)),
        UnsupportedOpError,
        r"custom\.onnx: ONNX Runtime cannot run node 'odd' \(com\.acme:Foo\)",
    ),
    BadCase(
        "nan_calibration",
        lambda f: _call(f, calib=_npz(f.folder, "nan.npz", x=np.where(calib_x() > 2, np.nan, calib_x()))),
        CalibrationError,
        rf"nan\.npz: input 'x' contains NaN \(first at index \({', '.join(map(str, FIRST_BIG))}\)\)$",
    ),
    BadCase(  # inf is data and accepted, but LayerNorm turns a row holding inf into NaN
        "inf_into_layernorm_computes_nan",
        lambda f: _call(f, calib=_npz(f.folder, "inf.npz", x=np.where(calib_x() > 2, np.inf, calib_x()))),
        CalibrationError,
        r"calibration produced NaN at 'h\d' \(batch 0, row \d+\): the model computes NaN on this data$",
    ),
    BadCase(
        "nan_in_one_feed_of_a_folder",
        lambda f: _call(f, calib=_feed_folder(f)),
        CalibrationError,
        r"feeds/b\.npz: input 'x' contains NaN \(first at index \(1, 2, 3\)\)$",
    ),
    BadCase(
        "empty_calibration_file",
        lambda f: _call(f, calib=_npz(f.folder, "empty.npz")),
        CalibrationError,
        r"empty\.npz: the calibration file holds no arrays",
    ),
    BadCase(
        "zero_rows",
        lambda f: _call(f, calib=_npz(f.folder, "rows0.npz", x=calib_x()[:0])),
        CalibrationError,
        r"rows0\.npz: calibration data has 0 samples",
    ),
    BadCase(
        "string_dtype",
        lambda f: _call(f, calib=_npz(f.folder, "str.npz", x=np.array([["a", "b"]]))),
        CalibrationError,
        r"str\.npz: input 'x' has dtype <U1, expected a numeric array",
    ),
    BadCase(
        "integer_dtype",
        lambda f: _call(f, calib=_npz(f.folder, "int.npz", x=np.ones((2, 4, DIM), np.int64))),
        CalibrationError,
        r"int\.npz: input 'x' has dtype int64, the model expects float32",
    ),
    BadCase(
        "wrong_channels",
        lambda f: _call(f, calib=_npz(f.folder, "width.npz", x=calib_x()[..., :15])),
        CalibrationError,
        r"width\.npz: input 'x' has shape \(8, 4, 15\), the model expects",
    ),
    BadCase(
        "wrong_rank",
        lambda f: _call(f, calib=_npz(f.folder, "rank.npz", x=calib_x()[:, 0])),
        CalibrationError,
        r"rank\.npz: input 'x' has shape \(8, 16\), the model expects rank 3",
    ),
    BadCase(
        "wrong_input_names",
        lambda f: _call(f, calib=_npz(f.folder, "names.npz", tokens=calib_x())),
        CalibrationError,
        r"names\.npz: .*missing 'x'; unknown 'tokens'",
    ),
    BadCase(
        "pickled_calibration",
        lambda f: _call(f, calib=_npz(f.folder, "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))),
        CalibrationError,
        r"pickled\.npz: not a readable \.npz calibration file .*allow_pickle",
    ),
    BadCase(
        "unknown_recipe_name",
        lambda f: _call(f, recipe="w9a9"),
        ConfigError,
        r"unknown recipe 'w9a9'",
    ),
    BadCase(
        "unknown_recipe_key",
        lambda f: _call(f, recipe=str(_write(f.folder, "typo.yaml", "pases: [smooth_quant]\n"))),
        ConfigError,
        r"typo\.yaml: recipe key 'pases' is unknown",
    ),
    BadCase(
        "wrong_recipe_type",
        lambda f: _call(f, recipe=str(_write(f.folder, "type.yaml", "weights: {group: big}\n"))),
        ConfigError,
        r"type\.yaml: recipe key 'weights\.group': expected int \| null, got str 'big'",
    ),
    BadCase(
        "wrong_pass_option_type",
        lambda f: _call(
            f, recipe=str(_write(f.folder, "alpha.yaml", "passes: [smooth_quant: {alpha: high}]\n"))
        ),
        ConfigError,
        r"alpha\.yaml: recipe key 'smooth_quant\.alpha': expected float \| 'auto', got str 'high'",
    ),
    BadCase(
        "yaml_python_tag",
        lambda f: _call(
            f, recipe=str(_write(f.folder, "evil.yaml", "name: !!python/object/apply:os.getcwd []\n"))
        ),
        ConfigError,
        r"evil\.yaml: not valid yaml",
    ),
    BadCase(
        "missing_output_dir",
        lambda f: _call(f, dst=f.folder / "no" / "such" / "q.onnx"),
        OutputPathError,
        r"q\.onnx: output folder '.*no/such' does not exist",
    ),
    BadCase(
        "readonly_output_dir",
        lambda f: _call(f, dst=_readonly_dir(f)),
        OutputPathError,
        r"q\.onnx: output folder '.*' is not writable",
    ),
    BadCase(
        "output_is_input",
        lambda f: _call(f, dst=f.model),
        OutputPathError,
        r"tiny\.onnx: the output path is the input model",
    ),
    BadCase(
        "output_is_input_via_symlink",
        lambda f: _call(f, dst=_symlink_to_input(f)),
        OutputPathError,
        r"alias\.onnx: the output path is the input model",
    ),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_library_raises_the_named_error(files, case):
    call = case.make(files)
    before = _sha(files.model)
    with pytest.raises(case.error, match=case.message):
        quantize_file(call.src, call.dst, call.recipe, call.calib)
    assert _sha(files.model) == before
    assert not call.dst.exists() or call.dst.resolve() == files.model.resolve()
    assert not list(call.dst.parent.glob(".*tmp*")) if call.dst.parent.is_dir() else True


# Runs `qpass.cli.main` (the console-script entry point) once per argv, each in a forked child
# process with its own stderr, exactly as `qpass ...` would; one interpreter start for all cases.
CLI_DRIVER = """
import json, os, sys, traceback
from qpass.cli import main
import qpass.api  # the heavy imports once, before forking

results = []
for argv in json.load(sys.stdin):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    results.append({"rc": os.waitstatus_to_exitcode(status), "stderr": err})
json.dump(results, sys.stdout)
"""


def run_cli_many(argvs: list[list[str]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", CLI_DRIVER],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cli_results(files) -> dict[str, dict]:
    calls: dict[str, Call] = {}
    for case in CASES:
        try:
            calls[case.name] = case.make(files)
        except pytest.skip.Exception:
            continue
    argvs = [
        ["quantize", str(c.src), "-o", str(c.dst), "--recipe", c.recipe, "--calib", str(c.calib), "--quiet"]
        for c in calls.values()
    ]
    before = _sha(files.model)
    results = dict(zip(calls, run_cli_many(argvs), strict=True))
    assert _sha(files.model) == before
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_prints_one_line_and_exits_1(cli_results, case):
    if case.name not in cli_results:
        pytest.skip("case not available to this user")
    res = cli_results[case.name]
    assert res["rc"] in (1, 2), res["stderr"]
    lines = res["stderr"].strip().splitlines()
    assert len(lines) == 1, res["stderr"]
    assert "Traceback" not in res["stderr"]
    assert lines[0].startswith("qpass: error: ") and re.search(case.message, lines[0]), lines[0]


def test_cli_driver_sees_tracebacks_and_usage_errors(files):
    """The driver is not blind: a usage error exits 2 and a success exits 0 with no error line."""
    usage, ok = run_cli_many(
        [
            ["quantize", str(files.model)],
            [
                "quantize",
                str(files.model),
                "-o",
                str(files.folder / "ok.onnx"),
                "--recipe",
                "w8a8",
                "--calib",
                str(files.calib),
                "--quiet",
            ],
        ]
    )
    assert usage["rc"] == 2 and "usage:" in usage["stderr"]
    assert ok["rc"] == 0 and "error" not in ok["stderr"]
    assert (files.folder / "ok.onnx").is_file()


def test_unknown_op_site_is_skipped_and_the_rest_quantized(files):
    """Sin (an op qpass has no kind for) reads LN2's output: smoothing skips the sites it touches
    and names it; mm1's site is smoothed; all three MatMuls are still quantized.
    """
    result = quantize_with_report(str(files.model), "w8a8-smooth", str(files.calib))
    smooth = result.report.results[0].plan
    assert [n.site for n in smooth.applied_sites] == ["h1 -> mm1"]
    reasons = " | ".join(n.detail for n in smooth.skipped_sites)
    assert "Sin 'odd'" in reasons
    producers = {o: n for n in result.model.graph.node for o in n.output}
    quantized = [
        n.name
        for n in result.model.graph.node
        if n.op_type == "MatMul"
        and producers.get(n.input[1])
        and producers[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert sorted(quantized) == ["mm1", "mm2", "mm3"]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(files.model), providers=["CPUExecutionProvider"])
    x = calib_x(2, 4)
    y, y_ref = sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0]
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05


def test_unknown_op_on_torch_is_skipped_too():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = torch.nn.LayerNorm(DIM)
            self.a, self.b = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)

        def forward(self, x):
            h = self.ln(x)
            return self.a(h) + self.b(torch.sin(h))

    torch.manual_seed(0)
    batches = [torch.from_numpy(calib_x(4, 4))]
    result = quantize_with_report(Net().eval(), "w8a8-smooth", batches)
    smooth = result.report.results[0].plan
    assert any("sin" in n.detail for n in smooth.skipped_sites)
    assert len(result.report.results[-1].plan.edits) == 2  # both linears quantized


@pytest.mark.parametrize(("batch", "seq"), [(1, 3), (5, 11)])
def test_symbolic_batch_and_sequence_survive(files, batch, seq):
    q = qpass.quantize(str(files.model), "w8a8-smooth", str(files.calib))
    dims = [d.dim_param or d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", DIM]
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(files.model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).standard_normal((batch, seq, DIM)).astype(np.float32)
    y, y_ref = sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0]
    assert y.shape == (batch, seq, DIM)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05


def test_calibration_with_another_sequence_length_than_export(files, tmp_path):
    """Symbolic dims accept calibration of any batch and sequence length."""
    calib = _npz(tmp_path, "long.npz", x=calib_x(3, 9))
    out = quantize_file(files.model, tmp_path / "q.onnx", "w8a8", calib)
    assert out.report.results[-1].plan.edits
