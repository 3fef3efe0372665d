"""The package's layers point one way, and the rule is checked by parsing, not by trust.

Every module under `qpass/`, `passes/`, `lowering/` and `kernels/` is parsed (imports inside
functions included, `TYPE_CHECKING` blocks too: a type-only upward import is still a cycle waiting to
happen) and each `qpass...` import is checked against the allowed directions below. The layers:

- base: errors, config, qconfig, formats, math, threads, io, data (depends on nothing of ours above)
- kernels: Triton/CPU kernels (base only)
- graph: the neutral view, refs, edits, adapters, the region walker (base only)
- core: calibration, the block pipeline, the pass contract and manager, the quantize stage, evaluation
  (graph + base)
- passes: `QPass` subclasses only (core and below)
- lowering: graph kinds' lowerings (core, kernels and below)
- registry: the one module that looks upward (names passes and lowerings)
- app: recipe, api, cli, zoo, report, sources, backend... (anything, through the registry)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "qpass": ROOT / "qpass",
    "qpass.passes": ROOT / "passes",
    "qpass.lowering": ROOT / "lowering",
    "qpass.kernels": ROOT / "kernels",
}
MAX_LINES = 400

BASE = {"errors", "config", "qconfig", "formats", "math", "threads", "io", "data"}
GRAPH = {"graph"}
CORE = {"calibration", "pass_base", "pass_manager", "quant", "evaluate", "pipeline", "pipeline_dist"}

ALLOWED = {
    "base": {"base"},
    "kernels": {"kernels", "base"},
    "graph": {"graph", "base"},
    "core": {"core", "graph", "base"},
    "passes": {"passes", "core", "graph", "base"},
    "lowering": {"lowering", "kernels", "core", "graph", "base"},
    "registry": {"registry", "passes", "lowering", "kernels", "core", "graph", "base", "app"},
    "app": {"app", "registry", "core", "graph", "base"},
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name under `qpass`."""
    parts = module.split(".")
    if parts[0] != "qpass":
        raise ValueError(module)
    if len(parts) == 1:
        return "app"  # qpass/__init__.py: the public facade
    head = parts[1]
    if head in ("passes", "lowering", "kernels"):
        return head
    if head == "registry":
        return "registry"
    if head in BASE:
        return "base"
    if head in GRAPH:
        return "graph"
    if head in CORE:
        return "core"
    return "app"


def modules() -> list[tuple[str, Path]]:
    found = []
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if package == "qpass" and path.relative_to(folder).parts[0] in ("passes", "lowering", "kernels"):
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def imported_names(module: str, path: Path) -> list[tuple[int, str]]:
    """Every `qpass...` module that `module` imports, with its line number (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "qpass":
                # `from qpass import io` imports the submodule qpass.io
                out += [(node.lineno, f"qpass.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return [(line, name) for line, name in out if name == "qpass" or name.startswith("qpass.")]


ALL_MODULES = modules()


def test_the_tree_is_found():
    names = {m for m, _ in ALL_MODULES}
    assert {
        "qpass.registry",
        "qpass.passes.smooth",
        "qpass.lowering.onnxruntime",
        "qpass.kernels.w8a8",
    } <= names


def test_imports_point_one_way():
    bad = []
    for module, path in ALL_MODULES:
        src = layer_of(module)
        for line, target in imported_names(module, path):
            if target == "qpass":
                # the facade's lazy names resolve to app modules
                dst = "app"
            else:
                dst = layer_of(target)
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {dst} ({target})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path):
    """The parser sees imports inside functions and resolves relative imports."""
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from ..passes import smooth\n    import qpass.lowering.onnxruntime\n")
    names = [n for _, n in imported_names("qpass.graph.x", mod)]
    assert "qpass.passes" in names and "qpass.lowering.onnxruntime" in names
    assert layer_of("qpass.passes.smooth") not in ALLOWED[layer_of("qpass.graph.fx")]


@pytest.mark.parametrize(("module", "path"), ALL_MODULES, ids=[m for m, _ in ALL_MODULES])
def test_no_module_over_the_line_limit(module, path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES}): split it by concern"


def test_passes_hold_only_qpass_subclasses():
    """`passes/` modules define QPass subclasses and their configs; helpers live in the core or graph."""
    import importlib
    import inspect

    from qpass.pass_base import QPass

    for module, _path in ALL_MODULES:
        if not module.startswith("qpass.passes."):
            continue
        mod = importlib.import_module(module)
        classes = [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == module]
        passes = [c for c in classes if issubclass(c, QPass)]
        assert passes, f"{module} defines no QPass subclass"
        others = [
            c.__name__
            for c in classes
            if not issubclass(c, QPass) and not c.__name__.endswith(("Config", "Site"))
        ]
        assert not others, f"{module} defines non-pass classes {others}: move them to the core or graph layer"
