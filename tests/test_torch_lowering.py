"""QuantLinear picks a real integer kernel where the formats allow it (torch._int_mm on CPU) and
gives the reference path's result; quantized models save to one .pt2 file and load without
recalibration, with bit-identical outputs.
"""

from __future__ import annotations

import pytest
import torch
from models import llama_inputs

import qpass
from qpass.errors import ModelLoadError
from qpass.lowering.torch_backend import LinearKernel, QuantLinear
from qpass.saved_model import load_quantized, save_quantized

W4_GPTQ_G32 = {
    "name": "w4-g32-gptq",
    "weights": {"format": "int4", "group": 32, "symmetric": False, "algo": "gptq", "act_order": True},
    "target": "torch",
}
CASES = {
    "w8a8-dynamic": LinearKernel.W8A8_DYNAMIC,
    "w8a8-smooth": LinearKernel.W8A8_STATIC,  # asymmetric uint8 activations run as int8 + bias fix
    "w4-g32-gptq": LinearKernel.W4A16,
}


def _recipe(name):
    return W4_GPTQ_G32 if name == "w4-g32-gptq" else name


@pytest.fixture(scope="module")
def quantized(llama_case):
    calib = llama_case.batches[:2]
    return {name: qpass.quantize(llama_case.model, _recipe(name), calibration=calib) for name in CASES}


def _reference_output(model, x):
    """The same model with every QuantLinear forced onto the fake-quant reference path."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kernels = [m.kernel for m in mods]
    try:
        for m in mods:
            m.kernel = LinearKernel.REFERENCE
        with torch.no_grad():
            return model(x)
    finally:
        for m, k in zip(mods, kernels, strict=True):
            m.kernel = k


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_choice_and_equivalence_to_reference(quantized, name):
    model = quantized[name]
    kinds = {m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {CASES[name]}
    x = llama_inputs(seed=11)
    with torch.no_grad():
        y = model(x)
    ref = _reference_output(model, x)
    # integer GEMMs sum in int32 exactly; only float rounding order differs from the reference
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


def test_w8a8_linear_calls_the_int8_ops(quantized):
    gm = quantized["w8a8-dynamic"]
    x = llama_inputs(seed=12)
    traced = torch.export.export(gm, (x,), strict=False)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.ops.qpass.quantize_per_token.default in targets
    assert torch.ops.qpass.int8_gemm.default in targets
    assert torch.ops.aten.linear.default not in targets


@pytest.mark.parametrize("name", ["w8a8-smooth", "w4-g32-gptq"])
def test_save_load_round_trip_is_exact(quantized, name, tmp_path):
    model = quantized[name]
    path = tmp_path / "model.pt2"
    save_quantized(model, path, llama_inputs(seed=0))
    loaded = load_quantized(path)
    assert loaded.recipe is not None and loaded.recipe.name == name
    for x in (llama_inputs(seed=13), torch.randn(3, 5, 64)):  # another batch and sequence length
        with torch.no_grad():
            assert torch.equal(loaded.module(x), model(x))
    ep = torch.export.load(str(path))
    saved = {**ep.state_dict, **ep.constants}
    dtypes = {v.dtype for v in saved.values()}
    if name == "w4-g32-gptq":  # packed nibbles: two weights per byte, no float weight copy
        shapes = {tuple(v.shape) for v in saved.values() if v.dtype == torch.uint8}
        assert {(160, 32), (64, 80)} <= shapes  # gate/up [160, 64] and down [64, 160] weights, packed
        assert not {(160, 64), (64, 160)} & shapes  # the unpacked codes were not written
    else:
        assert torch.int8 in dtypes
    big_float = [
        k for k, v in saved.items() if v.is_floating_point() and v.dim() == 2 and v.numel() >= 64 * 64
    ]
    assert big_float == []  # no dequantized float weight was written


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such quantized model file"):
        load_quantized(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="bad.pt2: not a qpass .pt2 model"):
        load_quantized(bad)


# QuaRot layout (online Hadamard before down_proj) with per-token W8A8: the fusable pattern
ROTATED_W8A8 = {
    "passes": [
        {"fuse_norms": {}},
        {"rotate": {"kind": "hadamard", "layout": "residual", "online": True}},
    ],
    "weights": {"format": "int8"},
    "activations": {"format": "int8", "granularity": "per_token", "dynamic": True},
    "target": "torch",
}


def test_online_hadamard_fuses_into_per_token_quantizer(monkeypatch):
    """QuaRot's online Hadamard before down_proj (hidden 128, a power of two) folds into the W8A8
    module's quantizer; the CPU result is bit-identical to the unfused graph, and saves/loads.
    """
    from models import TinyLlama

    import qpass.lowering.torch_backend as tb
    import qpass.lowering.torch_lower

    torch.manual_seed(0)
    model = TinyLlama(dim=64, hidden=128).eval()
    x = llama_inputs(seed=3)
    recipe = ROTATED_W8A8
    fused = qpass.quantize(model, recipe, calibration=[x])
    mods = [m for m in fused.modules() if isinstance(m, tb.QuantLinear) and m.rotation_signs is not None]
    assert len(mods) == 2  # one down_proj per block
    assert all(m.kernel is tb.LinearKernel.W8A8_DYNAMIC for m in mods)
    hadamards = [n for n in fused.graph.nodes if "hadamard_transform" in str(n.target)]
    monkeypatch.setattr(qpass.lowering.torch_lower, "fuse_rotations_into_quantize", lambda gm: 0)
    plain = qpass.quantize(model, recipe, calibration=[x])
    plain_hadamards = [n for n in plain.graph.nodes if "hadamard_transform" in str(n.target)]
    assert len(plain_hadamards) == len(hadamards) + 2
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_fused_rotation_quantizer_saves_and_loads(tmp_path):
    from models import TinyLlama

    import qpass.lowering.torch_backend as tb
    import qpass.lowering.torch_lower

    torch.manual_seed(0)
    model = TinyLlama(dim=64, hidden=128).eval()
    x = llama_inputs(seed=3)
    recipe = ROTATED_W8A8
    q = qpass.quantize(model, recipe, calibration=[x])
    assert any(isinstance(m, tb.QuantLinear) and m.rotation_signs is not None for m in q.modules())
    save_quantized(q, tmp_path / "r.pt2", x)
    loaded = load_quantized(tmp_path / "r.pt2").module
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-6, atol=1e-6)
