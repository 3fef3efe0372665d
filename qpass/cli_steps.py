"""The steps the `qpass` commands share: reading data, opening a model as a graph view, checking
output paths before any work, saving torch results and writing reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpass.errors import ConfigError, OutputPathError, QPassError

if TYPE_CHECKING:
    from qpass.api import QuantizeResult
    from qpass.graph.view import GraphView
    from qpass.recipe import Recipe


class Console:
    """Messages on stderr unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"qpass: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared steps
def load_chunks(args: argparse.Namespace, source: str, console: Console, verb: str) -> list[dict]:
    from qpass.sources import count_samples, load_data

    chunks = load_data(source, tokenizer=args.tokenizer, batch_size=args.batch_size, max_len=args.max_len)
    if getattr(args, "feeds", False):
        console.say(f"{verb} {len(chunks)} feeds from {source} (each run as is)")
    else:
        console.say(f"{verb} {count_samples(chunks)} samples from {source} (batches of {args.batch_size})")
    return chunks


def onnx_data(args: argparse.Namespace, chunks: list[dict]) -> Any:
    """The chunks named by their files (errors name the file); `--feeds`: each one feed, run as is."""
    from qpass.sources import as_feeds

    return as_feeds(args.calib, chunks, split=not getattr(args, "feeds", False))


def torch_setup(args: argparse.Namespace, chunks: list[dict]) -> tuple[Any, Any, Any]:
    """The factory's model, its batches (`Feeds` with --feeds: verified on each) and example input."""
    from qpass.data import Feeds
    from qpass.sources import chunk_origins, example_inputs, keyword_batches, load_factory, parse_input_spec

    model = load_factory(args.input)
    feeds = getattr(args, "feeds", False)
    batches = keyword_batches(chunks, model, args.batch_size, args.calib, feeds)
    specs = [parse_input_spec(s) for s in args.inputs]
    example = example_inputs(specs, model) if specs else batches[0]
    return model, Feeds(batches, chunk_origins(args.calib, chunks)) if feeds else batches, example


def check_model(spec: str, *, torch_ok: bool = True) -> bool:
    """Whether `spec` is an ONNX file (True) or a torch factory (False); anything else is an error."""
    from qpass.sources import check_model_spec, is_onnx_path

    check_model_spec(spec)
    if is_onnx_path(spec):
        return True
    if not torch_ok:
        msg = f"{spec}: expected an .onnx file here"
        raise ConfigError(msg)
    return False


def write_outlier_report(
    view: GraphView,
    batches: list,
    samples: int,
    args: argparse.Namespace,
    recipe: Recipe | None,
    console: Console,
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


def check_report_dir(folder: str) -> None:
    parent = Path(folder).resolve().parent
    if not parent.is_dir():
        msg = f"{folder}: report folder's parent '{parent}' does not exist"
        raise OutputPathError(msg)


def check_pt2_output(output: str) -> Path:
    from qpass.io import check_output_path

    out = check_output_path(output)
    if out.suffix != ".pt2":
        msg = f"{output}: a torch model is saved as a .pt2 (torch.export); name the output *.pt2"
        raise OutputPathError(msg)
    return out


def recipe_path_for(out: Path) -> Path:
    """Where the recipe of a saved torch model goes: `model.q.pt2` -> `model.q.recipe.yaml`."""
    return out.with_name(out.stem + ".recipe.yaml")


def save_torch(result: QuantizeResult, example: Any, out: Path, console: Console) -> None:
    """The quantized GraphModule re-exported and saved with torch.export, and its recipe beside it."""
    import torch

    from qpass.graph.fx_capture import all_dims_auto, split_batch

    args, kwargs = split_batch(example)
    try:  # dims the model leaves free stay dynamic, as in capture; else the example's shapes
        dynamic = all_dims_auto(result.model, args, kwargs)
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


def write_pass_report(result: QuantizeResult, folder: Path) -> None:
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


def open_model(args: argparse.Namespace, chunks: list[dict]) -> tuple[GraphView, list]:
    """A fresh GraphView of the input model and its batches."""
    from qpass.api import open_view
    from qpass.data import onnx_batches

    if check_model(args.input):
        view = open_view(args.input)
        return view, onnx_batches(view.model, onnx_data(args, chunks), args.batch_size)
    from qpass.data import torch_batches

    model, batches, example = torch_setup(args, chunks)
    return open_view(model, example), torch_batches(batches, args.calib)
