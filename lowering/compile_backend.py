"""The torch mechanics under `torch.compile(backend="qpass")`: freezing the parameters dynamo lifted
into graph inputs, and compiling a (quantized) graph with Inductor or running it eagerly.

Dynamo gives a backend a GraphModule whose parameters and buffers arrive as graph inputs.
`freeze_parameters` makes them constants (inference: the weights are about to be quantized
anyway) so the quantize stage sees ordinary weights; `compile_graph` hands the result to
Inductor (`compile_fx`). What a recipe asks for, and calling the quantize pipeline, is the app's
business: `qpass.backend` orchestrates and reaches these functions through `qpass.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from qpass.errors import ConfigError


def _is_param_or_buffer(node: fx.Node) -> bool:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if source is not None else ""
    name = name() if callable(name) else str(name)
    return "._parameters[" in name or "._buffers[" in name


def freeze_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """A copy of `gm` with the parameter/buffer inputs dynamo lifted made constants, and the positions
    of the remaining (user) inputs. Dynamo's own graph is left untouched: it calls the compiled
    function with the inputs of the graph it handed over.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    gm = fx.GraphModule(gm, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        msg = f"qpass backend: {len(placeholders)} graph inputs but {len(example_inputs)} example inputs"
        raise ConfigError(msg)
    keep: list[int] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if isinstance(value, torch.Tensor) and (
            isinstance(value, torch.nn.Parameter) or _is_param_or_buffer(node)
        ):
            name = f"_qpass_frozen_{i}"
            gm.register_buffer(name, value.detach())
            with gm.graph.inserting_after(placeholders[-1]):
                attr = gm.graph.get_attr(name)
            node.replace_all_uses_with(attr)
            gm.graph.erase_node(node)
        else:
            keep.append(i)
    gm.graph.lint()
    gm.recompile()
    return gm, keep


def trace_aten(gm: fx.GraphModule) -> fx.GraphModule | None:
    """`gm` (dynamo's graph, parameters frozen) retraced to ATen in dynamo's own fake mode, or None
    outside a dynamo compile.

    Why not torch.export: dynamo's graphs take SymInt inputs and tensors whose sizes are dynamo's
    symbols (a decode step's cache length). Re-exporting them fails, or adds shape guards to a frame
    dynamo is still compiling. Tracing with the fake values dynamo recorded on the placeholders keeps
    its symbols; `pre_dispatch` keeps `aten.linear` whole, as torch.export does, so the graph view
    sees the same ops on both routes. The frozen weights are real tensors: the fake mode takes them
    as constants while tracing.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    context = torch._guards.TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if fake_mode is None or any("example_value" not in n.meta for n in placeholders):
        return None
    fakes = [n.meta["example_value"] for n in placeholders]
    allow = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        with fake_mode:
            traced = make_fx(gm, tracing_mode="fake", pre_dispatch=True, _allow_non_fake_inputs=True)(*fakes)
    finally:
        fake_mode.allow_non_fake_inputs = allow
    traced.meta["qpass_captured"] = True
    return traced


def concrete_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Dynamo's example inputs with each SymInt replaced by its hint: values the graph can run on."""
    return tuple(
        (v.node.hint if isinstance(v, torch.SymInt) else v.detach().clone() if isinstance(v, torch.Tensor) else v)
        for v in inputs
    )


def compile_graph(gm: fx.GraphModule, inputs: Sequence[Any], inductor: bool = True) -> Callable[..., Any]:
    """`gm` compiled with Inductor on `inputs`, or (`inductor=False`) its eager forward."""
    if not inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(inputs))
