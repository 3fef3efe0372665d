"""The `qpass` command line. Exit codes: 0 success, 1 failure (one-line cause), 2 usage error.

Results go to stdout (tables, YAML, JSON); what is happening (calibration, pass summaries,
progress bars) goes to stderr and is silenced by `--quiet`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qpass.errors import ConfigError, OutputPathError, QPassError

_EPILOG = """\
models:  an .onnx file, or (quantize/inspect/eval) an importable 'module:factory' returning a
         torch.nn.Module; `qpass quantize` saves torch results as a .pt2 (torch.export) that
         `qpass eval` reads back.
data:    an .npz with one array per model input (batch on axis 0), a folder of .npz/.npy files,
         or a .txt file with one sample a line plus --tokenizer (minilm, smollm2 or a folder).

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


class _Console:
    """Messages on stderr unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"qpass: {text}", file=sys.stderr, flush=True)


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
        "load: qpass.lowering.torch_save.register_qpass_ops(); torch.export.load(path).module()) "
        "plus the recipe as OUT-stem.recipe.yaml.",
    )
    q.add_argument("input", help="an .onnx model (opened read-only) or a torch 'module:factory'")
    q.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .onnx (ONNX input) or .pt2 (torch input), written atomically",
    )
    q.add_argument(
        "--recipe", required=True, help="built-in recipe name (see `qpass recipes`) or a recipe file"
    )
    _add_data_args(q, "--calib")
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
    return p


# ----------------------------------------------------------------------------- shared steps
def _load_chunks(args: argparse.Namespace, source: str, console: _Console, verb: str) -> list[dict]:
    from qpass.sources import count_samples, load_data

    chunks = load_data(source, tokenizer=args.tokenizer, batch_size=args.batch_size, max_len=args.max_len)
    n = count_samples(chunks)
    console.say(f"{verb} {n} samples from {source} (batches of {args.batch_size})")
    return chunks


def _onnx_data(source: str, chunks: list[dict]) -> Any:
    """A single .npz is passed by path, so validation errors name the file."""
    return source if Path(source).suffix == ".npz" and Path(source).is_file() else chunks


def _torch_setup(args: argparse.Namespace, chunks: list[dict]) -> tuple[Any, list, Any]:
    from qpass.sources import example_inputs, keyword_batches, load_factory, parse_input_spec

    model = load_factory(args.input)
    batches = keyword_batches(chunks, model, args.batch_size, args.calib)
    specs = [parse_input_spec(s) for s in args.inputs]
    example = example_inputs(specs, model) if specs else batches[0]
    return model, batches, example


def _check_model(spec: str, *, torch_ok: bool = True) -> bool:
    """Whether `spec` is an ONNX file (True) or a torch factory (False); anything else is an error."""
    from qpass.sources import check_model_spec, is_onnx_path

    check_model_spec(spec)
    if is_onnx_path(spec):
        return True
    if not torch_ok:
        msg = f"{spec}: expected an .onnx file here"
        raise ConfigError(msg)
    return False


def _write_outlier_report(
    view: Any, batches: list, samples: int, args: argparse.Namespace, recipe: Any, console: _Console
) -> None:
    from qpass.report.html import write_report
    from qpass.report.outliers import DEFAULT_RATIO, analyze

    ratio = getattr(args, "outlier_ratio", None) or DEFAULT_RATIO
    console.say(
        "collecting per-channel ranges of every linear layer"
        + (f", then running {recipe.name}'s passes" if recipe else "")
    )
    report = analyze(
        view,
        batches,
        model=Path(args.input).name if args.input.endswith(".onnx") else args.input,
        samples=samples,
        ratio=ratio,
        recipe=recipe,
        verify=args.verify,
        progress=not args.quiet,
    )
    for line in report.passes:
        console.say(line)
    console.say("plotting")
    json_path, html_path = write_report(report, args.report)
    n_out = sum(1 for layer in report.layers if layer.before.act.outliers())
    console.say(f"{len(report.layers)} linear layers, {n_out} with activation outlier channels")
    console.say(f"wrote {html_path} and {json_path}")


# ----------------------------------------------------------------------------- commands
def _quantize(args: argparse.Namespace, console: _Console) -> int:
    from qpass.api import quantize_file, quantize_with_report
    from qpass.recipe import get_recipe
    from qpass.sources import count_samples

    is_onnx = _check_model(args.input)
    recipe = get_recipe(args.recipe)
    if args.report:
        _check_report_dir(args.report)
    console.say(f"quantizing {args.input} with recipe '{recipe.name}'")
    chunks = _load_chunks(args, args.calib, console, "calibrating on")
    options = {"batch_size": args.batch_size, "verify": args.verify, "progress": not args.quiet}
    if is_onnx:
        data = _onnx_data(args.calib, chunks)
        result = quantize_file(args.input, args.output, recipe, data, **options)
    else:
        out = _check_pt2_output(args.output)
        model, batches, example = _torch_setup(args, chunks)
        result = quantize_with_report(model, recipe, batches, example_inputs=example, **options)
        _save_torch(result, example, out, console)
    for line in result.report.summary().splitlines():
        console.say(line)
    console.say(f"wrote {args.output}")
    if args.report:
        _write_pass_report(result, Path(args.report))
        view, batches = _open(args, chunks)
        _write_outlier_report(view, batches, count_samples(chunks), args, recipe, console)
    return 0


def _check_report_dir(folder: str) -> None:
    parent = Path(folder).resolve().parent
    if not parent.is_dir():
        msg = f"{folder}: report folder's parent '{parent}' does not exist"
        raise OutputPathError(msg)


def _check_pt2_output(output: str) -> Path:
    from qpass.io import check_output_path

    out = check_output_path(output)
    if out.suffix != ".pt2":
        msg = f"{output}: a torch model is saved as a .pt2 (torch.export); name the output *.pt2"
        raise OutputPathError(msg)
    return out


def recipe_path_for(out: Path) -> Path:
    """Where the recipe of a saved torch model goes: `model.q.pt2` -> `model.q.recipe.yaml`."""
    return out.with_name(out.stem + ".recipe.yaml")


def _save_torch(result: Any, example: Any, out: Path, console: _Console) -> None:
    """The quantized GraphModule re-exported and saved with torch.export, and its recipe beside it."""
    import torch

    from qpass.graph.fx_capture import _all_dims_auto, split_batch

    args, kwargs = split_batch(example)
    try:  # dims the model leaves free stay dynamic, as in capture; else the example's shapes
        dynamic = _all_dims_auto(result.model, args, kwargs)
        program = torch.export.export(result.model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - fall back to static shapes below
        try:
            program = torch.export.export(result.model, args, kwargs, strict=False)
        except Exception as exc:  # torch.export raises many types; say which step failed
            first = str(exc).splitlines()[0] if str(exc) else ""
            msg = (
                f"{out}: cannot save the quantized torch model (torch.export: {type(exc).__name__}: {first})"
            )
            raise QPassError(msg) from exc
        console.say(f"note: {out} accepts only the example input shapes (static export)")
    from qpass.io import atomic_path

    tmp = out.with_name(f".{out.stem}.tmp.pt2")  # torch.export.save wants a .pt2 name
    try:
        torch.export.save(program, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    recipe_path = recipe_path_for(out)
    with atomic_path(recipe_path) as tmp:
        tmp.write_text(result.recipe.to_yaml())
    console.say(f"wrote {recipe_path}")


def _write_pass_report(result: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    passes = [
        {
            "pass": r.name,
            "edits": len(r.plan.edits),
            "max_rel_error": r.max_rel_error,
            "sites": [{"site": n.site, "applied": n.applied, "detail": n.detail} for n in r.plan.notes],
        }
        for r in result.report.results
    ]
    doc = {"recipe": result.recipe.to_dict(), "passes": passes}
    (folder / "passes.json").write_text(json.dumps(doc, indent=1))


def _open(args: argparse.Namespace, chunks: list[dict]) -> tuple[Any, list]:
    """A fresh GraphView of the input model and its batches."""
    from qpass.api import open_view
    from qpass.data import onnx_batches

    if _check_model(args.input):
        view = open_view(args.input)
        return view, onnx_batches(view.model, _onnx_data(args.calib, chunks), args.batch_size)
    model, batches, example = _torch_setup(args, chunks)
    return open_view(model, example), batches


def _inspect(args: argparse.Namespace, console: _Console) -> int:
    from qpass.recipe import get_recipe
    from qpass.sources import count_samples

    _check_model(args.input)
    recipe = get_recipe(args.recipe) if args.recipe else None
    _check_report_dir(args.report)
    if args.outlier_ratio is not None and args.outlier_ratio <= 1:
        msg = f"--outlier-ratio {args.outlier_ratio}: must be > 1 (a multiple of the median channel)"
        raise ConfigError(msg)
    chunks = _load_chunks(args, args.calib, console, "calibrating on")
    view, batches = _open(args, chunks)
    _write_outlier_report(view, batches, count_samples(chunks), args, recipe, console)
    return 0


def _eval_model(spec: str, input_names: list[str] | None = None) -> Any:
    from qpass.evaluate import onnx_model, torch_model
    from qpass.sources import (
        is_onnx_path,
        is_program_path,
        load_factory,
        load_program,
        torch_input_names,
    )

    if is_onnx_path(spec):
        if not Path(spec).is_file():
            msg = f"{spec}: no such ONNX file"
            raise QPassError(msg)
        return onnx_model(spec)
    if is_program_path(spec):
        return torch_model(spec, load_program(spec), input_names or [])
    module = load_factory(spec)
    return torch_model(spec, module, torch_input_names(module))


def _eval(args: argparse.Namespace, console: _Console) -> int:
    from qpass.evaluate import Task, compare
    from qpass.sources import check_model_spec

    for spec in (args.fp, args.quant):
        check_model_spec(spec)
    chunks = _load_chunks(args, args.data, console, "evaluating on")
    fp = _eval_model(args.fp)
    # a .pt2 takes the FP model's inputs (it was exported from it)
    quant = _eval_model(args.quant, fp.input_names)
    if not quant.input_names:
        quant.input_names = sorted(chunks[0])
    if not fp.input_names:
        fp.input_names = sorted(chunks[0])
    console.say(f"comparing {args.quant} with {args.fp}")
    result = compare(
        fp,
        quant,
        chunks,
        task=Task(args.task),
        batch_size=args.batch_size,
        origin=args.data,
        progress=not args.quiet,
    )
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0


def _zoo(args: argparse.Namespace, console: _Console) -> int:
    from qpass import zoo

    folder = Path(args.folder)
    _check_report_dir(str(folder))
    folder.mkdir(exist_ok=True)
    for split, name in (("calib", "calib.txt"), ("eval", "eval.txt")):
        (folder / name).write_text("\n".join(zoo.sentences(split, args.samples)) + "\n")
    console.say(f"exporting MiniLM to {folder / 'minilm.onnx'}")
    zoo.export_minilm_onnx(folder / "minilm.onnx")
    console.say(f"wrote {folder / 'minilm.onnx'}, {folder / 'calib.txt'} and {folder / 'eval.txt'}")
    return 0


def _recipes(args: argparse.Namespace, console: _Console) -> int:
    from qpass.recipe import builtin_names, get_recipe

    if args.action == "show":
        if not args.name:
            msg = "`qpass recipes show` needs a recipe name"
            raise QPassError(msg)
        print(get_recipe(args.name).to_yaml(), end="")
        return 0
    for name in builtin_names():
        print(f"{name:24s} {get_recipe(name).description}")
    return 0


_COMMANDS = {"quantize": _quantize, "inspect": _inspect, "eval": _eval, "zoo": _zoo, "recipes": _recipes}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    logging.basicConfig(level=logging.WARNING, format="qpass: %(message)s")
    if quiet:  # library warnings (torch, transformers) are noise to a quiet run
        warnings.filterwarnings("ignore")
    console = _Console(quiet)
    try:
        return _COMMANDS[args.command](args, console)
    except QPassError as exc:
        print(f"qpass: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qpass: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
