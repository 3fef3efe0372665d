"""`qpass quantize GENAI_DIR -o OUT_DIR --recipe R --calib text.txt`: an ONNX Runtime GenAI folder.

The folder's decoder is calibrated on text tokenized by its own tokenizer.json (full rows of
`--max-len` tokens plus one decoded token, no padding) and written as a new folder that
`og.Model(OUT_DIR)` loads (`qpass.api.quantize_genai`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qpass.cli_steps import Console
from qpass.errors import ConfigError
from qpass.genai_folder import is_genai_folder


def is_genai_source(spec: str) -> bool:
    """A GenAI folder, or any folder that is not a transformers one (its error then names genai_config.json)."""
    path = Path(spec)
    return is_genai_folder(path) or (path.is_dir() and not (path / "config.json").is_file())


def quantize_genai_folder(args: argparse.Namespace, console: Console) -> int:
    from qpass.api import quantize_genai
    from qpass.genai_feeds import GenAICalibration
    from qpass.recipe import get_recipe

    if args.tokenizer:
        msg = f"{args.input}: a GenAI folder tokenizes with its own tokenizer.json; drop --tokenizer"
        raise ConfigError(msg)
    if not str(args.calib).endswith(".txt"):
        msg = f"{args.calib}: a GenAI folder calibrates on text (a .txt file)"
        raise ConfigError(msg)
    recipe = get_recipe(args.recipe)
    console.say(f"quantizing {args.input} (GenAI folder) with recipe '{recipe.name}'")
    result = quantize_genai(
        args.input,
        args.output,
        recipe,
        args.calib,
        GenAICalibration(seq_len=args.max_len),
        verify=args.verify,
        progress=not args.quiet,
    )
    for line in result.report.summary().splitlines():
        console.say(line)
    console.say(f"wrote {result.model}")
    return 0
