"""Transformers causal LMs in, the same model out, quantized in its own modules, generating with
its KV cache (`qpass.causal_lm`).

Tiny random-weight models are built from transformers' own configs for several families (no
download); the real SmolLM2 case is in tests/test_causal_lm_real.py. Each quantized model is checked
against the graph route of the same recipe (the lowered GraphModule of the same logits): the
mapping onto modules must compute what the verified graph computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

import qpass
from qpass.causal_lm import is_causal_lm
from qpass.errors import CalibrationError, ConfigError
from qpass.lm_inputs import token_rows
from qpass.lowering.torch_backend import QuantLinear
from qpass.lowering.torch_lower import PostRotated, PreRotated

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
FAMILIES = {
    "llama-tied": (T.LlamaConfig, T.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),  # q/k/v biases, GQA
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"pad_token_id": 0}),  # fused qkv and gate_up
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),  # q/k norms
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {"pad_token_id": 0, "eos_token_id": 1}),  # post-norms
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {}),  # residual / logit multipliers
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, {}),  # LayerNorm, partial rotary
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 16}),  # scaled embeddings, (1 + w) norms
}


def _model(family: str) -> nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **extra)).eval()


def _calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 32), generator=g) for _ in range(2)]


class _Logits(nn.Module):
    """The graph route's model: the same LM as a plain module mapping input_ids to logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _greedy_by_recompute(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation with no cache: every step runs the whole prefix."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


CASES = [(f, r) for f in FAMILIES for r in ("w8a8-dynamic", "w4a16")] + [
    ("llama-tied", "w4a8-rotate"),
    ("qwen2", "w4a8-rotate"),
    ("qwen2", "w8a8-smooth-dynamic"),
    ("mistral", "w4a16-gptq"),
]


@pytest.mark.parametrize(("family", "recipe"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_quantized_lm_generates_and_matches_the_graph_route(family, recipe):
    model = _model(family)
    calib = _calibration()
    probe = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fp_before = model(input_ids=probe).logits
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())

    result = qpass.quantize_with_report(model, recipe, calib)
    q = result.model
    assert type(q) is type(model) and q is not model and is_causal_lm(q)
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, fp_before)  # the user's model is untouched
    quantized = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == n_linears  # every linear, the (tied) head included
    assert not any(isinstance(m, nn.Linear) for m in q.modules())

    # the module mapping computes what the verified, lowered graph computes
    graph = qpass.quantize(_Logits(copy.deepcopy(model)), recipe, [(c,) for c in calib])
    with torch.no_grad():
        ours = q(input_ids=probe, use_cache=False).logits
        assert _rel(ours, graph(probe)) < 1e-5
        assert _rel(ours, fp_before) < (0.05 if recipe.startswith("w8") else 0.5)

    # generate() runs on the KV cache, batch 2, and agrees with recomputing the prefix each step
    prompt = probe[:, :6]
    cached = q.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, _greedy_by_recompute(q, prompt, 8))
    sampled = q.generate(prompt, max_new_tokens=4, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 10)


def test_online_rotations_live_in_the_modules_that_hold_them():
    """QuaRot on a tied model: the embedding's output and the final norm's input are rotated online
    (the shared table cannot take Q), the Hadamard before each down_proj sits with down_proj.
    """
    q = qpass.quantize(_model("llama-tied"), "w4a8-rotate", _calibration())
    assert isinstance(q.model.embed_tokens, PostRotated)
    assert isinstance(q.model.norm, PreRotated)
    for layer in q.model.layers:
        assert isinstance(layer.mlp.down_proj, PreRotated)
        assert isinstance(layer.mlp.down_proj.inner, QuantLinear)
        assert layer.mlp.down_proj.signs is not None  # the O(n log n) Hadamard, not a dense matrix


def test_inplace_returns_the_users_model():
    model = _model("qwen2")
    q = qpass.quantize(model, "w8a8-dynamic", _calibration(), inplace=True)
    assert q is model
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_recipe_whose_ops_have_no_module_is_refused():
    model = _model("mistral")
    with pytest.raises(ConfigError, match=r"recipe 'int4-splitquant': .*(no module|has no module)") as err:
        qpass.quantize(model, "int4-splitquant", _calibration())
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_calibration_forms():
    ids = torch.randint(0, VOCAB, (2, 16))
    assert [t.shape for t in token_rows([ids, {"input_ids": ids[0]}])] == [(2, 16), (1, 16)]
    with pytest.raises(CalibrationError, match="batch 0: 'attention_mask' has padding"):
        token_rows([{"input_ids": ids, "attention_mask": torch.tensor([[1] * 16, [1] * 8 + [0] * 8])}])
    with pytest.raises(CalibrationError, match="text needs the model's tokenizer"):
        token_rows(["some text"])
    with pytest.raises(CalibrationError, match="batch 0: expected integer input_ids"):
        token_rows([torch.randn(2, 16)])


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a8-rotate", "w8a8-smooth-dynamic"])
def test_save_pretrained_and_load_give_bit_identical_logits(recipe, tmp_path):
    from safetensors import safe_open

    q = qpass.quantize(_model("llama-tied"), recipe, _calibration())
    probe = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    q.save_pretrained(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "qpass_quantization.json"]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:  # safetensors, no pickle
        codes = [k for k in f.keys() if k.endswith("::codes")]
        assert len(codes) == 15
        if recipe.startswith("w4"):  # 4-bit codes stored two per byte
            k = "qpass::model.layers.0.self_attn.q_proj::codes"
            assert f.get_tensor(k).numel() == 64 * 64 // 2
    loaded = qpass.load(tmp_path / "out")
    assert type(loaded) is type(q)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, q(input_ids=probe).logits)
    prompt = probe[:1, :5]
    assert torch.equal(
        loaded.generate(prompt, max_new_tokens=6, do_sample=False),
        q.generate(prompt, max_new_tokens=6, do_sample=False),
    )
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same folder
    assert qpass.load(tmp_path / "again") is not None


def test_load_names_the_missing_file(tmp_path):
    from qpass.errors import ModelLoadError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"not a qpass model folder \(no qpass_quantization.json\)"):
        qpass.load(tmp_path)


def test_compiling_the_quantized_lm_with_the_qpass_backend_keeps_its_tokens():
    q = qpass.quantize(_model("llama-tied"), "w8a8-dynamic", _calibration())
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    eager = q.generate(prompt, max_new_tokens=6, do_sample=False)
    q.forward = torch.compile(q.forward, backend="qpass")  # Inductor over the QuantLinear kernel ops
    assert torch.equal(q.generate(prompt, max_new_tokens=6, do_sample=False), eager)


def test_compile_first_quantizes_the_graphs_dynamo_hands_over():
    """A stock model's forward compiled with a recipe: the prefill graph, the first decode step and
    the decode graph with a symbolic cache length (SymInt inputs) are each quantized as they come,
    without re-exporting them, and generate what eager `qpass.quantize` generates.
    """
    from qpass.backend import qpass_backend

    model = _model("qwen2")
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    gen = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        fp = model.generate(prompt, **gen)
        eager = qpass.quantize(model, "w8a8-dynamic", _calibration()).generate(prompt, **gen)
    symbolic: list[bool] = []

    def backend(gm, example_inputs):  # backend="qpass" with options=, recording what dynamo passes
        symbolic.append(any(isinstance(v, torch.SymInt) for v in example_inputs))
        return qpass_backend(gm, example_inputs, {"recipe": "w8a8-dynamic"})

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        out = model.generate(prompt, **gen)
    torch._dynamo.reset()
    assert any(symbolic) and not all(symbolic)  # static prefill/decode graphs and a symbolic one
    assert torch.equal(out.sequences, eager.sequences)
    got, ref, base = (torch.stack(r.scores) for r in (out, eager, fp))
    assert _rel(got, ref) < 1e-4 < _rel(got, base)  # eager qpass's quantized logits, not FP32's


@pytest.mark.parametrize("recipe", ["w8a8-smooth-dynamic", "w4a16-gptq", "w4a8-rotate"])
def test_calibrate_then_compile_generates_what_eager_qpass_does(recipe):
    """Recipes that need statistics (smoothing, GPTQ) or fold rotations: `qpass.calibrate` runs the
    passes and the calibration once and attaches each linear's quantized form to its weight; every
    graph dynamo captures during `generate()` is lowered from that, bit for bit as eager qpass.
    """
    model = _model("qwen2")
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    gen = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = qpass.quantize(model, recipe, _calibration()).generate(prompt, **gen)
    assert qpass.calibrate(model, recipe, _calibration()) is model
    assert sum(hasattr(p, "qpass_qlinear") for p in model.parameters()) == 2 * 7 + 1
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="qpass", options={"recipe": recipe, "inductor": False})
    try:
        with torch.no_grad():
            out = model.generate(prompt, **gen)
        assert torch.equal(out.sequences, eager.sequences)
        assert torch.equal(torch.stack(out.scores), torch.stack(eager.scores))
        torch._dynamo.reset()
        model.forward = torch.compile(model.__class__.forward.__get__(model), backend="qpass",
                                      options={"recipe": "w8a8-dynamic", "inductor": False})  # fmt: skip
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
            model.generate(prompt, max_new_tokens=2, do_sample=False)
        assert isinstance(info.value.inner_exception, ConfigError)
        assert f"calibrated with qpass.calibrate for ['{recipe}']" in str(info.value.inner_exception)
    finally:
        torch._dynamo.reset()


def test_calibrate_refuses_models_it_cannot_attach_to():
    with pytest.raises(ConfigError, match="qpass.calibrate attaches to transformers causal LMs; for a Linear"):
        qpass.calibrate(nn.Linear(4, 4), "w8a8", [torch.randn(2, 4)])


def _through_cache(model, ids, cache, chunk=8):
    """Teacher-forced logits fed chunk by chunk through `cache` (later chunks read the quantized past)."""
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids[:, i : i + chunk], past_key_values=cache, use_cache=True).logits
                for i in range(0, ids.shape[1], chunk)
            ],
            dim=1,
        )


def test_kv_cache_quantization_is_applied_inside_the_cache():
    from qpass.lm_kv_cache import QuantizedKVCache
    from qpass.qconfig import KVCacheConfig

    model = _model("qwen2")
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    errors = {}
    for fmt in ("int8", "int4"):
        cache = QuantizedKVCache(model.config, KVCacheConfig(format=fmt))
        errors[fmt] = _rel(_through_cache(model, ids, cache), ref)
        assert cache.get_seq_length() == 80
        # held as packed codes (whole groups of 32 tokens for per-channel K) plus the float window
        layer = cache.layers[0]
        window = layer.window_k.shape[-2]
        token_bytes = 2 * 2 * 2 * 16 * 4  # K and V, batch 2, 2 KV heads, head dim 16, float32
        packed = layer.nbytes - window * token_bytes
        bits = {"int8": 8, "int4": 4}[fmt]
        assert window == 48 and cache.nbytes == sum(x.nbytes for x in cache.layers)
        assert 32 * token_bytes * bits // 32 < packed < 32 * token_bytes * (bits + 3) // 32  # scales: < 3 bits
    assert 0 < errors["int8"] < 1e-3 < errors["int4"] < 0.05
    # beam search reorders the packed history with its scales
    beams = QuantizedKVCache(model.config, KVCacheConfig(format="int4", residual=0, group=8))
    out = model.generate(ids[:1, :24], past_key_values=beams, max_new_tokens=12, num_beams=2, do_sample=False)
    assert out.shape == (1, 36) and beams.get_seq_length() >= 24
    # tokens inside the float residual window are exact: nothing quantized yet
    window = QuantizedKVCache(model.config, KVCacheConfig(format="int4", residual=80))
    assert _rel(_through_cache(model, ids, window), ref) < 1e-6


def test_recipe_kv_cache_section_generates_and_survives_save(tmp_path):
    from qpass.lm_kv_cache import QuantizedKVCache

    recipe = {
        **qpass.get_recipe("w8a8-dynamic").to_dict(),
        "name": "kv4",
        "kv_cache": {"format": "int4", "rotate": "hadamard"},
    }
    q = qpass.quantize(_model("llama-tied"), recipe, _calibration())
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    out = q.generate(prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuantizedKVCache) and out.sequences.shape == (1, 46)
    q.save_pretrained(tmp_path / "kv")
    loaded = qpass.load(tmp_path / "kv")
    assert loaded.qpass_kv_cache == q.qpass_kv_cache
    assert torch.equal(loaded.generate(prompt, max_new_tokens=40, do_sample=False), out.sequences)
    with pytest.raises(ConfigError, match="key 'kv_cache' applies to transformers causal LMs"):
        qpass.quantize(_Logits(_model("qwen2")), recipe, [(c,) for c in _calibration()])


def test_builtin_w4a4kv4_rotate_keeps_its_cache_at_four_bits():
    """The built-in W4A4 + KV4 recipe: rotations and GPTQ in the modules, keys and values through
    the recipe's INT4 cache, which generate() uses.
    """
    from qpass.lm_kv_cache import QuantizedKVCache

    q = qpass.quantize(_model("qwen2"), "w4a4kv4-rotate", _calibration())
    assert q.qpass_kv_cache.format == "int4" and q.qpass_kv_cache.rotate == "hadamard"
    assert any(isinstance(m, (PreRotated, PostRotated)) for m in q.modules())
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    out = q.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.past_key_values, QuantizedKVCache) and out.sequences.shape == (2, 18)
