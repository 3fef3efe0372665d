"""The real SmolLM2-135M (Llama, tied embeddings, loaded from its GGUF with the cache on) through
`qpass.quantize`: the result is the same transformers model, generating on its KV cache.

One quantization per recipe per test session (module fixture); calibration is packed text of the
corpus's "calib" split, the prompts are unrelated.
"""

from __future__ import annotations

import pytest
import torch

import qpass
from qpass import zoo
from qpass.lowering.torch_backend import QuantLinear

pytestmark = pytest.mark.slow  # real models (SmolLM2, Qwen2.5)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In Python, a list comprehension"]


@pytest.fixture(scope="module")
def smollm2():
    model, tok = zoo.load_smollm2()
    model.config.use_cache = True  # the zoo turns it off for graph capture; users keep it on
    fp = {}
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        fp[p] = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    return model, tok, fp


def _quantize(smollm2, recipe):
    model, tok, _ = smollm2
    return qpass.quantize(
        model, recipe, calibration=zoo.text_corpus("calib"), tokenizer=tok, seq_len=128, max_rows=8
    )


def test_smooth_w8a8_keeps_the_first_8_greedy_tokens(smollm2):
    """Teacher-forced on FP32's own greedy continuation, the quantized model picks FP32's token at
    each of the 8 steps wherever FP32 is not at a near-tie (top-2 logit margin below 1.0; this
    model has several at 0.2-0.4 on these prompts, where any rounding may flip the pick); and it
    generates, on its cache, FP32's continuation up to the first such tie.
    """
    model, tok, fp = smollm2
    q = _quantize(smollm2, "w8a8-smooth-dynamic")
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 30 * 7 + 1  # every linear, head included
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        full = torch.cat([ids[0], fp[p]])[None]
        with torch.no_grad():
            ref = model(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1]
            got = q(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1]
        top = ref.topk(2, -1).values
        confident = (top[:, 0] - top[:, 1]) >= 1.0
        assert torch.equal(got.argmax(-1)[confident], fp[p][confident]), p
        out = q.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        first_tie = int((~confident).nonzero()[0]) if (~confident).any() else 8
        assert torch.equal(out[:first_tie], fp[p][:first_tie]), (
            p,
            tok.decode(out),
            tok.decode(fp[p]),
        )


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w4a8-rotate"])
def test_low_bit_recipes_generate(smollm2, recipe):
    _, tok, _ = smollm2
    q = _quantize(smollm2, recipe)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    torch.manual_seed(0)  # sampling: a sampled EOS would end the sequence early, so ask for all 8
    out = q.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=20)
    assert out.shape == (1, ids.shape[1] + 8)
    assert q.config.use_cache and type(q).__name__ == "LlamaForCausalLM"


def _compile_first_matches_eager(model, tok):
    """`torch.compile(m.forward, backend="qpass", options={"recipe": ...})` on the stock model, then
    `generate()`: the graphs dynamo hands over (prefill, decode, decode with a symbolic cache length)
    are quantized as they come and give eager `qpass.quantize`'s greedy tokens. Inductor is off:
    compiling the quantized kernel ops with it is tested on a tiny model (tests/test_causal_lm.py);
    here it would add two minutes of code generation and test nothing more of qpass.
    """
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        eager = qpass.quantize(model, "w8a8-dynamic", calibration=[ids]).generate(
            ids, max_new_tokens=8, do_sample=False
        )
    torch._dynamo.reset()
    model.forward = torch.compile(
        model.forward, backend="qpass", options={"recipe": "w8a8-dynamic", "inductor": False}
    )
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        del model.forward  # the instance attribute: the class's forward again, for the other tests
        torch._dynamo.reset()
    assert torch.equal(out, eager), (tok.decode(out[0]), tok.decode(eager[0]))


def test_compile_first_generates_what_eager_qpass_does(smollm2):
    model, tok, _ = smollm2
    _compile_first_matches_eager(model, tok)


@pytest.fixture(scope="module")
def qwen25():
    """Qwen2.5-Coder-0.5B (attention biases, GQA 14/2, tied head), loaded from its GGUF as shipped."""
    return zoo.load_qwen25(copy_model=False)


QWEN_SMOOTH_W8A8 = {  # fixed alpha: the per-site search is SmolLM2's tests' (two minutes more here)
    "passes": [{"smooth_quant": {"alpha": 0.5}}],
    "weights": {"format": "int8", "symmetric": True},
    "activations": {"format": "int8", "granularity": "per_token", "dynamic": True},
}


def test_qwen25_smooth_w8a8_generates_and_tracks_fp32(qwen25):
    """Qwen2's attention biases and GQA 14/2 through capture, smoothing (verified exact, the
    v -> o_proj sites shared across each KV head's group) and W8A8; the quantized model, still a
    Qwen2ForCausalLM on its cache, picks FP32's token wherever FP32 is not at a near-tie and
    generates FP32's continuation up to the first such tie.
    """
    model, tok = qwen25
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    fp = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert tok.decode(fp) == " Paris. Paris is located in the north"
    res = qpass.quantize_with_report(
        model, QWEN_SMOOTH_W8A8, zoo.text_corpus("calib"), tokenizer=tok, seq_len=64, max_rows=4
    )
    smooth = res.report.results[0]
    assert smooth.max_rel_error is not None and smooth.max_rel_error <= 1e-4
    assert len(smooth.plan.applied_sites) >= 3 * 24, smooth.plan.applied_sites  # qkv, gate/up, down per layer
    q = res.model
    assert type(q).__name__ == "Qwen2ForCausalLM" and q.config.use_cache
    full = torch.cat([ids[0], fp])[None]
    with torch.no_grad():
        ref = model(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1]
        got = q(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1]
    top = ref.topk(2, -1).values
    confident = (top[:, 0] - top[:, 1]) >= 1.0
    assert confident.sum() >= 4, top
    assert torch.equal(got.argmax(-1)[confident], fp[confident])
    out = q.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    first_tie = int((~confident).nonzero()[0]) if (~confident).any() else 8
    assert torch.equal(out[:first_tie], fp[:first_tie]), tok.decode(out)
