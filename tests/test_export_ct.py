"""compressed-tensors export (`qpass.export_ct`): the checkpoint loads in plain transformers plus the
compressed-tensors library, in a process that never imports qpass, and decodes to qpass's weights.

W4A16 (pack-quantized, GPTQ act-order groups) matches qpass's logits; for W8A8 (int-quantized,
dynamic per-token activations) plain transformers decompresses the weights but leaves the
activation quantization to the serving kernels (vLLM), so the weights are compared bit for bit and
the activation scheme read from the config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as T

import qpass
from qpass.errors import ConfigError
from qpass.export_ct import export_compressed_tensors

LOADER = r"""
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
out, probe = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
with torch.no_grad():
    logits = m(input_ids=torch.from_numpy(np.load(probe))).logits
weights = {n: mod.weight.detach().float().numpy() for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
np.savez(out + ".result.npz", logits=logits.numpy(), **{"w:" + k: v for k, v in weights.items()})
assert not any(k == "qpass" or k.startswith("qpass.") for k in sys.modules), "the loader imported qpass"
"""


def _model(hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return T.LlamaForCausalLM(config).eval()


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)]


def _load_elsewhere(out, probe, tmp_path) -> dict[str, np.ndarray]:
    np.save(tmp_path / "probe.npy", probe.numpy())
    res = subprocess.run(
        [sys.executable, "-P", "-c", LOADER, str(out), str(tmp_path / "probe.npy")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(str(out) + ".result.npz"))


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w8a8-dynamic"])
def test_export_loads_in_plain_transformers(recipe, tmp_path):
    q = qpass.quantize(_model(), {"name": "g32", **_recipe(recipe)}, _calibration())
    out = export_compressed_tensors(q, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    group = qc["config_groups"]["group_0"]
    probe = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    result = _load_elsewhere(out, probe, tmp_path)
    for name, module in q.named_modules():
        if getattr(module, "qpass_qlinear", None) is not None:
            assert np.array_equal(result["w:" + name], module.qpass_qlinear.dequantized_weight().numpy()), (
                name
            )
    if recipe == "w4a16-gptq":
        assert qc["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4
        assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
        with torch.no_grad():
            ref = q(input_ids=probe).logits
        err = float(np.linalg.norm(result["logits"] - ref.numpy()) / np.linalg.norm(ref.numpy()))
        assert err <= 1e-3
    else:
        assert qc["format"] == "int-quantized"
        act = group["input_activations"]
        assert (act["num_bits"], act["strategy"], act["dynamic"]) == (8, "token", True)


def _recipe(name: str) -> dict:
    from qpass.recipe import get_recipe

    data = get_recipe(name).to_dict()
    if data["weights"].get("group"):
        data["weights"]["group"] = 32  # divides every width of the tiny model
    return data


def test_short_last_group_and_online_rotations_are_refused(tmp_path):
    q = qpass.quantize(_model(hidden=48), {"name": "g32", **_recipe("w4a16-gptq")}, _calibration())
    with pytest.raises(
        ConfigError, match=r"48 input channels in groups of 32 leave a short last group.*e\.g\. 24"
    ):
        export_compressed_tensors(q, tmp_path / "ct")
    a = qpass.quantize(_model(), {"name": "g32", **_recipe("w4a16")}, _calibration())  # asymmetric int4
    with pytest.raises(
        ConfigError, match="asymmetric 4-bit weights do not load back from compressed-tensors"
    ):
        export_compressed_tensors(a, tmp_path / "ct")
    fz = _recipe("w4a16")
    fz["weights"]["float_zero_point"] = True
    f = qpass.quantize(_model(), {"name": "g32fz", **fz}, _calibration())
    with pytest.raises(ConfigError, match="float zero points have no compressed-tensors form"):
        export_compressed_tensors(f, tmp_path / "ct")
    r = qpass.quantize(_model(), "w4a8-rotate", _calibration())
    with pytest.raises(ConfigError, match="online rotation, which compressed-tensors cannot hold"):
        export_compressed_tensors(r, tmp_path / "ct2")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ct2").exists()
