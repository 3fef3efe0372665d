"""Float zero points (`weights.float_zero_point`): the grid min + code * scale of GGUF Q4_1 / HQQ.

A weight already on such a grid (SmolLM2 ships as Q4_1: asymmetric blocks of 32) is reproduced
exactly by RTN and GPTQ, through both lowerings, where an integer zero point shifts the grid by
up to half a step.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import Case
from models import TinyLlama, llama_inputs

import qpass
from qpass.errors import ConfigError
from qpass.formats import ElementType, Granularity, QuantSpec
from qpass.quant.gptq import gptq
from qpass.recipe import get_recipe

G32 = {"format": "int4", "group": 32, "symmetric": False}


def _spec(float_zp: bool) -> QuantSpec:
    return QuantSpec(
        ElementType("int4"), Granularity.PER_GROUP, axis=-1, group_size=32, symmetric=False,
        float_zero_point=float_zp,
    )  # fmt: skip


def _on_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights d * code + m per block of 32 with float d, m (Q4_1's form); codes 0 and 15 occur."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(rows, cols // 32, 1, generator=g) * 0.1 + 0.01
    m = torch.randn(rows, cols // 32, 1, generator=g) * 0.3
    codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    return (codes * d + m).reshape(rows, cols)


def test_a_q4_1_grid_is_reproduced_and_an_integer_zero_point_is_not():
    w = _on_grid(16, 128)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    rel = lambda a: float((a - w).norm() / w.norm())  # noqa: E731
    fz, iz = _spec(True), _spec(False)
    assert rel(fz.fake_quantize(w)) < 1e-6 and rel(fz.quantize(w).dequantize()) < 1e-6
    q = gptq(w, x.T @ x, fz, act_order=True, static_groups=True)
    assert q.zero_points.dtype == torch.float32 and rel(q.dequantized()) < 1e-6
    assert rel(iz.fake_quantize(w)) > 1e-2  # integer zero points: the grid moves


def test_config_checks():
    with pytest.raises(ConfigError, match="float_zero_point"):
        get_recipe({"weights": {"format": "int4", "float_zero_point": True}})  # symmetric
    with pytest.raises(ConfigError, match="float_zero_point"):
        _spec(True).replace(symmetric=True)


def _gridded_llama() -> Case:
    torch.manual_seed(0)
    model = TinyLlama().eval()
    with torch.no_grad():
        for i, lin in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.copy_(_on_grid(*lin.weight.shape, seed=i))
    return Case("gridded_llama", model, [llama_inputs(seed=i) for i in range(2)], ["x"])


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_gridded_model_quantizes_losslessly_on_both_graph_kinds(algo, tmp_path):
    """RTN, and GPTQ with static groups (scales from the original weights: the grid itself), give
    back the float model through torch and through MatMulNBits with float zero points.
    """
    case = _gridded_llama()
    probe = llama_inputs(seed=7)
    ref = case.reference(probe)
    for float_zp, bound in ((True, 1e-5), (False, None)):
        recipe = {"name": "g32", "passes": [], "activations": None,
                  "weights": {**G32, "algo": algo, "float_zero_point": float_zp,
                              **({"static_groups": True} if algo == "gptq" else {})}}  # fmt: skip
        q = qpass.quantize(copy.deepcopy(case.model), recipe, case.batches)
        with torch.no_grad():
            err_torch = float((q(probe) - ref).norm() / ref.norm())
        out = tmp_path / f"{algo}_{float_zp}.onnx"
        qpass.quantize_file(str(case.onnx_path(tmp_path)), str(out), recipe, case.onnx_calib())
        proto = onnx.load(str(out))
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 15  # every linear of the two blocks and the head
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, case.onnx_feed(probe))
        err_onnx = float(np.linalg.norm(y - ref.numpy()) / np.linalg.norm(ref.numpy()))
        if bound is not None:
            assert err_torch < bound and err_onnx < bound, (err_torch, err_onnx)
            inits = {i.name: i for i in proto.graph.initializer}
            zps = [inits[n.input[3]] for n in nbits]  # zero points in the scales' type
            assert all(z.data_type == onnx.TensorProto.FLOAT for z in zps)
        else:
            assert err_torch > 1e-4 and err_onnx > 1e-4, (err_torch, err_onnx)  # 10x the bound above


def test_a_packing_that_ort_reads_differently_is_refused(tmp_path, monkeypatch):
    """The MatMulNBits layout probe (lowering/nbits_probe.py): packing float zero points as uint8
    (the bug this feature first had: ORT then ran a wrong model) fails the lowering, naming the node.
    """
    from qpass.errors import QPassError
    from qpass.lowering import onnx_nbits, weight_packing

    real = weight_packing._unsigned_codes

    def truncating(q, cbits):
        codes, zp = real(q, cbits)
        return codes, None if zp is None else zp.astype(np.uint8)

    monkeypatch.setattr(weight_packing, "_unsigned_codes", truncating)
    monkeypatch.setattr(onnx_nbits, "_CHECKED_LAYOUTS", set())
    case = _gridded_llama()
    recipe = {"name": "g32", "passes": [], "activations": None, "weights": {**G32, "float_zero_point": True}}
    with pytest.raises(QPassError, match=r"node '.*': ONNX Runtime's MatMulNBits reads the packed weights"):
        qpass.quantize_file(
            str(case.onnx_path(tmp_path)), str(tmp_path / "bad.onnx"), recipe, case.onnx_calib()
        )
    assert not (tmp_path / "bad.onnx").exists()
