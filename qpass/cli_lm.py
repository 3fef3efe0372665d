"""The CLI's causal-LM route: `qpass quantize` on a transformers model folder or a shipped model name
writes the saved qpass folder (`qpass.lm_checkpoint`, with the tokenizer), `qpass generate` runs it.

Calibration text (`--calib file.txt`) is packed end to end into full rows of `--max-len` tokens
through the model's own tokenizer: no padding enters the ranges.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qpass.cli_steps import Console
from qpass.errors import ConfigError, ModelLoadError

SHIPPED_LMS = ("smollm2", "qwen25")


def is_lm_source(spec: str) -> bool:
    """A shipped causal LM's name, or a folder holding a transformers `config.json`."""
    return spec in SHIPPED_LMS or (Path(spec).is_dir() and (Path(spec) / "config.json").is_file())


def load_lm_source(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer) for `spec`, loaded the ordinary way (the config as shipped, cache on)."""
    from qpass import zoo

    if spec == "smollm2":
        model, tok = zoo.load_smollm2()
        model.config.use_cache = True  # the zoo switches it off for graph capture
        return model, tok
    if spec == "qwen25":
        return zoo.load_qwen25()
    if (Path(spec) / "qpass_quantization.json").is_file():
        msg = f"{spec}: already a qpass-quantized folder; quantize its FP32 source instead"
        raise ConfigError(msg)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"{spec}: cannot load a transformers causal LM ({first})"
        raise ModelLoadError(msg) from None
    return model, tok


def quantize_lm(args: argparse.Namespace, console: Console) -> int:
    """`qpass quantize MODEL_DIR|NAME -o OUT_DIR --recipe R --calib text.txt`."""
    from qpass.api import quantize_with_report
    from qpass.lm_checkpoint import save_lm
    from qpass.recipe import get_recipe
    from qpass.sources import read_text_samples

    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        msg = f"{args.output}: the output folder is the input model; choose another"
        raise ConfigError(msg)
    if out.exists() and not out.is_dir():
        msg = f"{args.output}: exists and is not a folder (a causal LM is written as a folder)"
        raise ConfigError(msg)
    recipe = get_recipe(args.recipe)
    if not str(args.calib).endswith(".txt"):
        msg = f"{args.calib}: causal LMs calibrate on text (a .txt file)"
        raise ConfigError(msg)
    texts = read_text_samples(Path(args.calib))
    console.say(f"quantizing {args.input} with recipe '{recipe.name}'")
    model, tok = load_lm_source(args.input)
    result = quantize_with_report(
        model, recipe, texts, tokenizer=tok, seq_len=args.max_len, verify=args.verify, progress=not args.quiet
    )
    for line in result.report.summary().splitlines():
        console.say(line)
    save_lm(result.model, out)
    tok.save_pretrained(out)
    console.say(f"wrote {out}")
    return 0


def generate(args: argparse.Namespace, console: Console) -> int:
    """`qpass generate DIR --prompt TEXT`: the continuation on stdout."""
    import torch
    from transformers import AutoTokenizer

    from qpass.lm_checkpoint import load_lm

    model = load_lm(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    out = model.generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.eos_token_id
    )
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def add_generate_parser(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text with a quantized causal LM folder",
        description="Load a folder written by `qpass quantize` from a causal LM and continue a prompt.",
    )
    g.add_argument("model", help="a folder written by `qpass quantize MODEL_DIR ...`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="print only errors (and the text)")


def lm_eval_model(spec: str) -> Any:
    """`qpass eval` on a causal LM: an FP folder or shipped name, or a folder `qpass quantize` wrote;
    called with `input_ids` (and the data's `attention_mask`), its output the logits.
    """
    import torch

    from qpass.evaluate import torch_model
    from qpass.lm_checkpoint import MANIFEST, load_lm

    model = load_lm(spec) if (Path(spec) / MANIFEST).is_file() else load_lm_source(spec)[0]

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return torch_model(spec, Logits().eval(), ["input_ids", "attention_mask"])
