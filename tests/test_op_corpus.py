"""An operator-case corpus this project did not design (issue 22, part 5): ONNX's own backend
node test cases (the `onnx` package ships them as Python generators), each a one-op model with
its inputs. A passes-only recipe runs over every case onnxruntime runs, with the case's own
inputs as the one explicit feed; every case must come back with unchanged outputs, or with a
clean one-line `UnsupportedOpError` naming the op. A refusal of the data is a qpass bug.

Cases onnxruntime cannot run, and cases whose inputs or outputs are not tensors (sequences,
optionals: not calibration data), are left out before qpass sees them, and counted. Cases whose
inputs hold NaN (IsNaN, fmod edge cases) meet qpass's one data policy, NaN is refused: each must be
refused naming the input and the index of its first NaN.
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qpass
from qpass.errors import QPassError, UnsupportedOpError

RECIPE = {
    "name": "corpus-passes",
    "description": "passes only: norm fusion, smoothing, rotation (no quantization)",
    "passes": [{"fuse_norms": {}}, {"smooth_quant": {"alpha": 0.5}}, {"rotate": {}}],
}
MIN_CASES = 250


def _tensor_only(model: onnx.ModelProto) -> bool:
    return all(v.type.HasField("tensor_type") for v in (*model.graph.input, *model.graph.output))


def _ort_run(model: onnx.ModelProto, feed: dict) -> list | None:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feed)
    except Exception:  # noqa: BLE001 - onnxruntime cannot run it: excluded, counted
        return None


@pytest.fixture(scope="module")
def corpus():
    """(name, model, feed, reference outputs) for every runnable tensor case, and the counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases(None)
    counts = collections.Counter(total=len(cases))
    runnable, nan_cases = [], []
    for case in sorted(cases, key=lambda c: c.name):
        if case.kind != "node" or case.model is None or not case.data_sets:
            counts["no model or data"] += 1
            continue
        model = case.model
        if not _tensor_only(model):
            counts["non-tensor inputs/outputs"] += 1
            continue
        inputs, _ = case.data_sets[0]
        names = [v.name for v in model.graph.input]
        if len(inputs) != len(names):
            counts["inputs do not match the graph"] += 1
            continue
        feed = {n: np.asarray(a) for n, a in zip(names, inputs, strict=True)}
        ref = _ort_run(model, feed)
        if ref is None:
            counts["onnxruntime cannot run"] += 1
            continue
        if any(a.dtype.kind == "f" and np.isnan(a).any() for a in feed.values()):
            counts["inputs hold NaN (refused by policy)"] += 1
            nan_cases.append((case.name, model, feed))
            continue
        runnable.append((case.name, model, feed, ref))
    counts["ran"] = len(runnable)
    return runnable, counts, nan_cases


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-5, atol=0.0, equal_nan=True))
    return bool(np.array_equal(a, b))


def _outcome(name, model, feed, ref):
    """'unchanged', 'refused: <op>' or a failure line naming the case."""
    try:
        out = qpass.quantize(model, RECIPE, qpass.Feeds([feed]))
    except UnsupportedOpError as exc:
        msg = str(exc)
        op = model.graph.node[0].op_type
        if "\n" not in msg and op in msg:
            return f"refused: {op}"
        return f"{name}: unclean refusal: {msg!r}"
    except QPassError as exc:
        return f"{name}: refused ({type(exc).__name__}): {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - reported with the case's name
        return f"{name}: crashed ({type(exc).__name__}): {str(exc).splitlines()[0] if str(exc) else ''}"
    got = _ort_run(out, feed)
    if got is None:
        return f"{name}: the output model does not run in onnxruntime"
    if len(got) != len(ref) or not all(_same(g, r) for g, r in zip(got, ref, strict=True)):
        return f"{name}: outputs changed"
    return "unchanged"


def test_corpus_runs_unchanged_or_refused_by_op(corpus):
    runnable, counts, _ = corpus
    start = time.perf_counter()
    outcomes = {name: _outcome(name, m, f, r) for name, m, f, r in runnable}
    failures = sorted(o for o in outcomes.values() if o != "unchanged" and not o.startswith("refused: "))
    refused = collections.Counter(o[len("refused: "):] for o in outcomes.values() if o.startswith("refused: "))
    unchanged = sum(1 for o in outcomes.values() if o == "unchanged")
    print(
        f"\ncorpus: {dict(counts)}; unchanged {unchanged}, refused by op {sum(refused.values())} "
        f"{dict(refused)}, failing {len(failures)}; qpass time {time.perf_counter() - start:.1f}s"
    )
    assert counts["ran"] >= MIN_CASES, counts
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures)


def test_corpus_cases_holding_nan_are_refused_naming_the_input(corpus):
    _, _, nan_cases = corpus
    assert nan_cases
    for name, model, feed in nan_cases:
        with pytest.raises(qpass.errors.CalibrationError, match=r"input '\w+' contains NaN \(first at index") as info:
            qpass.quantize(model, RECIPE, qpass.Feeds([feed]))
        assert "\n" not in str(info.value), name
