"""The `qpass` subcommands, one function each: arguments in, exit code out (errors raise `QPassError`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qpass.cli_genai import is_genai_source, quantize_genai_folder
from qpass.cli_lm import generate, is_lm_source, lm_eval_model, quantize_lm
from qpass.cli_steps import (
    Console,
    check_model,
    check_pt2_output,
    check_report_dir,
    load_chunks,
    onnx_data,
    open_model,
    save_torch,
    torch_setup,
    write_outlier_report,
    write_pass_report,
)
from qpass.errors import ConfigError, QPassError


# ----------------------------------------------------------------------------- commands
def _quantize(args: argparse.Namespace, console: Console) -> int:
    from qpass.api import quantize_file, quantize_with_report
    from qpass.recipe import get_recipe
    from qpass.sources import count_samples

    if is_genai_source(args.input):  # an ONNX Runtime GenAI folder: quantized into a new folder
        return quantize_genai_folder(args, console)
    if is_lm_source(args.input):  # a transformers causal LM: quantized in its modules, saved as a folder
        return quantize_lm(args, console)
    is_onnx = check_model(args.input)
    recipe = get_recipe(args.recipe)
    if args.report:
        check_report_dir(args.report)
    console.say(f"quantizing {args.input} with recipe '{recipe.name}'")
    chunks = load_chunks(args, args.calib, console, "calibrating on")
    options = {"batch_size": args.batch_size, "verify": args.verify, "progress": not args.quiet}
    if is_onnx:
        data = onnx_data(args, chunks)
        result = quantize_file(args.input, args.output, recipe, data, **options)
    else:
        out = check_pt2_output(args.output)
        model, batches, example = torch_setup(args, chunks)
        result = quantize_with_report(model, recipe, batches, example_inputs=example, **options)
        save_torch(result, example, out, console)
    for line in result.report.summary().splitlines():
        console.say(line)
    console.say(f"wrote {args.output}")
    if args.report:
        write_pass_report(result, Path(args.report))
        view, batches = open_model(args, chunks)
        write_outlier_report(view, batches, count_samples(chunks, args.feeds), args, recipe, console)
    return 0


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from qpass.recipe import get_recipe
    from qpass.sources import count_samples

    check_model(args.input)
    recipe = get_recipe(args.recipe) if args.recipe else None
    check_report_dir(args.report)
    if args.outlier_ratio is not None and args.outlier_ratio <= 1:
        msg = f"--outlier-ratio {args.outlier_ratio}: must be > 1 (a multiple of the median channel)"
        raise ConfigError(msg)
    chunks = load_chunks(args, args.calib, console, "calibrating on")
    view, batches = open_model(args, chunks)
    write_outlier_report(view, batches, count_samples(chunks, args.feeds), args, recipe, console)
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

    if is_lm_source(spec):
        return lm_eval_model(spec)
    if is_onnx_path(spec):
        if not Path(spec).is_file():
            msg = f"{spec}: no such ONNX file"
            raise QPassError(msg)
        return onnx_model(spec)
    if is_program_path(spec):
        return torch_model(spec, load_program(spec), input_names or [])
    module = load_factory(spec)
    return torch_model(spec, module, torch_input_names(module))


def _eval(args: argparse.Namespace, console: Console) -> int:
    from qpass.evaluate import Task, compare
    from qpass.sources import check_model_spec

    for spec in (args.fp, args.quant):
        if not is_lm_source(spec):
            check_model_spec(spec)
    chunks = load_chunks(args, args.data, console, "evaluating on")
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


def _zoo(args: argparse.Namespace, console: Console) -> int:
    from qpass import zoo

    folder = Path(args.folder)
    check_report_dir(str(folder))
    folder.mkdir(exist_ok=True)
    for split, name in (("calib", "calib.txt"), ("eval", "eval.txt")):
        (folder / name).write_text("\n".join(zoo.sentences(split, args.samples)) + "\n")
    console.say(f"exporting MiniLM to {folder / 'minilm.onnx'}")
    zoo.export_minilm_onnx(folder / "minilm.onnx")
    console.say(f"wrote {folder / 'minilm.onnx'}, {folder / 'calib.txt'} and {folder / 'eval.txt'}")
    return 0


def _recipes(args: argparse.Namespace, console: Console) -> int:
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


COMMANDS = {
    "quantize": _quantize,
    "inspect": _inspect,
    "eval": _eval,
    "zoo": _zoo,
    "recipes": _recipes,
    "generate": generate,
}
