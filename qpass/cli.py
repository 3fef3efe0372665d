"""The `qpass` command line. Exit codes: 0 success, 1 failure (one-line cause), 2 usage error.

Results go to stdout (tables, YAML, JSON); what is happening (calibration, pass summaries,
progress bars) goes to stderr and is silenced by `--quiet`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from qpass.cli_commands import COMMANDS
from qpass.cli_lm import add_generate_parser
from qpass.cli_steps import Console
from qpass.errors import QPassError

_EPILOG = """\
models:  an .onnx file, or (quantize/inspect/eval) an importable 'module:factory' returning a
         torch.nn.Module; `qpass quantize` saves torch results as a .pt2 (torch.export) that
         `qpass eval` reads back.
data:    an .npz with one array per model input (batch on axis 0), a folder of .npz/.npy files,
         or a .txt file with one sample a line plus --tokenizer (minilm, smollm2 or a folder).
         An .npz whose arrays do not share axis 0 (a scalar, a per-channel parameter) is one
         feed, run as is; --feeds makes every .npz one feed (never split, each verified).

examples:
  qpass zoo minilm work/
  qpass recipes
  qpass recipes show w8a8-smooth > my-recipe.yaml
  qpass quantize model.onnx -o model.q.onnx --recipe w8a8-smooth --calib calib.npz
  qpass quantize mypkg.models:build -o model.q.pt2 --recipe w8a8 --calib calib.npz \\
      --input x:1x16x64:float32
  qpass inspect model.onnx --calib calib.txt --tokenizer minilm --recipe w8a8-smooth --report outliers/
  qpass eval model.onnx model.q.onnx --data eval.npz --json
"""


# ----------------------------------------------------------------------------- parser
def _add_data_args(p: argparse.ArgumentParser, flag: str, required: bool = True) -> None:
    p.add_argument(
        flag,
        required=required,
        metavar="DATA",
        help=".npz (one array per model input, batch on axis 0), a folder of .npz/.npy, or a .txt "
        "with one sample a line (needs --tokenizer)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="NAME|DIR",
        help="tokenizer for .txt data: 'minilm', 'smollm2' (shipped) or a Hugging Face tokenizer folder",
    )
    p.add_argument(
        "--max-len", type=int, default=128, help="truncate tokenized text to this many tokens (default 128)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")


def _add_feeds(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--feeds",
        action="store_true",
        help="explicit feeds: every .npz of --calib (a file or a folder, one feed per file) is one "
        "complete input mapping, run as is with no splitting on axis 0; scalars and inputs of "
        "different leading sizes are fine; every equivalent pass is verified on each feed",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME:SHAPE[:DTYPE]",
        help="torch models only: an example input for torch.export, e.g. input_ids:1x128:int64 "
        "(repeat per forward argument; default: the first data batch)",
    )


def _add_verify(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--verify",
        dest="verify",
        action="store_true",
        default=True,
        help="check every equivalent pass numerically; a pass that changes the model's function is "
        "an error (default)",
    )
    g.add_argument("--no-verify", dest="verify", action="store_false", help="skip the equivalence checks")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qpass",
        description="Outlier-aware quantization compiler for ONNX and PyTorch models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        help="run a recipe's passes and quantize a model",
        description="Run a recipe's outlier passes (verified), calibrate and quantize. ONNX in: an .onnx "
        "out that stock onnxruntime runs. Torch 'module:factory' in: a .pt2 (torch.export.save; "
        "load: qpass.registry.register_qpass_ops(); torch.export.load(path).module()) "
        "plus the recipe as OUT-stem.recipe.yaml.",
    )
    q.add_argument(
        "input",
        help="an .onnx model (opened read-only), a torch 'module:factory', a transformers causal LM "
        "folder / shipped name (smollm2, qwen25: written as a folder that `qpass generate` runs), or an "
        "ONNX Runtime GenAI folder (genai_config.json; written as a folder og.Model loads, --calib text)",
    )
    q.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .onnx (ONNX input), .pt2 (torch input) or folder (causal LM, GenAI folder), "
        "written atomically",
    )
    q.add_argument(
        "--recipe", required=True, help="built-in recipe name (see `qpass recipes`) or a recipe file"
    )
    _add_data_args(q, "--calib")
    _add_feeds(q)
    _add_model_args(q)
    _add_verify(q)
    q.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/passes.json (what each pass did) and the outlier report (report.html, "
        "report.json, PNGs) before vs after the recipe's passes",
    )
    q.add_argument("--quiet", action="store_true", help="print only errors")

    i = sub.add_parser(
        "inspect",
        help="report outlier channels of every linear layer (HTML + PNG + JSON)",
        description="Per linear layer: per-input-channel absmax of activations and weights, kurtosis, "
        "outlier channels (index, magnitude, ratio to the median channel) and which layers share them. "
        "With --recipe, also after the recipe's passes (its quantization is not applied).",
    )
    i.add_argument("input", help="an .onnx model or a torch 'module:factory'")
    _add_data_args(i, "--calib")
    _add_feeds(i)
    _add_model_args(i)
    i.add_argument(
        "--report", required=True, metavar="DIR", help="folder for report.html, report.json and PNGs"
    )
    i.add_argument("--recipe", help="show the layers after this recipe's passes too (name or file)")
    i.add_argument(
        "--outlier-ratio",
        type=float,
        default=None,
        help="a channel is an outlier when its absmax is at least this times the median channel's (default 6)",
    )
    _add_verify(i)
    i.add_argument("--quiet", action="store_true", help="print only errors")

    e = sub.add_parser(
        "eval",
        help="compare a quantized model with its FP original on data",
        description="Per output: mean/min cosine per sample, relative error, top-1 agreement for "
        "classifier/LM-head outputs (outputs named *logit*, or all with --task classify); "
        "perplexity of both models with --task lm (data: input_ids [+ attention_mask]). Padded "
        "positions (attention_mask = 0) are left out.",
    )
    e.add_argument("fp", help="the FP model: .onnx or torch 'module:factory'")
    e.add_argument("quant", help="the quantized model: .onnx or a .pt2 written by `qpass quantize`")
    _add_data_args(e, "--data")
    e.add_argument(
        "--task",
        choices=["auto", "classify", "lm"],
        default="auto",
        help="auto: top-1 only on outputs named like logits; classify: top-1 on every output; "
        "lm: next-token logits, adds perplexity",
    )
    e.add_argument("--json", action="store_true", help="print the numbers as JSON on stdout")
    e.add_argument("--quiet", action="store_true", help="print only errors (and the result)")

    z = sub.add_parser(
        "zoo",
        help="write a shipped model as ONNX plus text to try the other commands on",
        description="`qpass zoo minilm DIR` exports the shipped MiniLM sentence encoder to DIR/minilm.onnx "
        "and writes DIR/calib.txt and DIR/eval.txt (disjoint sentences from the Python docs, one a line; "
        "use them with --tokenizer minilm). Needs no network.",
    )
    z.add_argument("model", choices=["minilm"], help="the shipped model")
    z.add_argument("folder", help="output folder (created if missing)")
    z.add_argument("--samples", type=int, default=128, help="sentences per text file (default 128)")
    z.add_argument("--quiet", action="store_true", help="print only errors")

    r = sub.add_parser(
        "recipes",
        help="list built-in recipes, or print one as YAML",
        description="`qpass recipes` lists the built-in recipes, one a line. `qpass recipes show NAME` "
        "prints its YAML, which is a valid --recipe file.",
    )
    r.add_argument(
        "action", nargs="?", choices=["list", "show"], default="list", help="list (default) or show"
    )
    r.add_argument("name", nargs="?", help="recipe name (or file) for `show`")
    add_generate_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    logging.basicConfig(level=logging.WARNING, format="qpass: %(message)s")
    if quiet:  # library warnings (torch, transformers) are noise to a quiet run
        warnings.filterwarnings("ignore")
    console = Console(quiet)
    try:
        return COMMANDS[args.command](args, console)
    except QPassError as exc:
        print(f"qpass: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qpass: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
