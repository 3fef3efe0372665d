"""`exclude:` / `only:` recipe selectors (`qpass.quant.selection`): the same linears stay float on
torch.fx and ONNX, by structural role or by name glob, and the report says which selector left each.
"""

from __future__ import annotations

import pytest

import qpass
from qpass.errors import ConfigError
from qpass.graph.refs import OpKind
from qpass.lowering.torch_backend import QuantLinear
from qpass.quant.selection import LayerSelection, Selector
from qpass.recipe import get_recipe


def _recipe(**select) -> dict:
    return {**get_recipe("w8a8-dynamic").to_dict(), "name": "sel", **select}


def _quantize_plan(llama_case, backend, onnx_dir, recipe):
    view = llama_case.view(backend, onnx_dir)
    model = llama_case.model if backend == "fx" else str(llama_case.onnx_path(onnx_dir))
    calib = llama_case.batches if backend == "fx" else llama_case.onnx_calib()
    result = qpass.quantize_with_report(model, recipe, calib)
    plan = next(r.plan for r in result.report.results if r.name == "quantize")
    return view, plan


def test_output_head_role_is_the_same_linear_on_both_graph_kinds(llama_case, onnx_dir):
    heads = {}
    for backend in ("fx", "onnx"):
        view = llama_case.view(backend, onnx_dir)
        selector = Selector(view, LayerSelection(exclude=("output_head",)))
        linears = list(view.ops(frozenset({OpKind.LINEAR})))
        skipped = [op for op in linears if selector.skip_reason(op)]
        assert len(skipped) == 1, backend
        heads[backend] = (linears.index(skipped[0]), len(linears))
    n = heads["fx"][1]
    assert heads["fx"] == heads["onnx"] == (n - 1, n)  # the last linear, the model's head


def test_excluded_linears_stay_float_with_the_reason(llama_case, backend, onnx_dir):
    view, plan = _quantize_plan(llama_case, backend, onnx_dir, _recipe(exclude=["output_head"]))
    skipped = [n for n in plan.notes if not n.applied and "recipe key" in n.detail]
    assert [n.detail for n in skipped] == ["excluded by recipe key 'exclude': 'output_head'"]
    # the attention's activation x activation products are reported float for their own reason
    assert all(
        "both operands are activations" in n.detail for n in plan.notes if not n.applied and n not in skipped
    )
    assert len(plan.edits) == len(list(view.ops(frozenset({OpKind.LINEAR})))) - 1


def test_name_globs_select_by_module_path_on_fx():
    from models import TinyLlama, llama_inputs

    model = TinyLlama()
    calib = [llama_inputs(seed=i) for i in range(2)]
    result = qpass.quantize_with_report(model, _recipe(only=["layers.1.*"]), calib)
    plan = next(r.plan for r in result.report.results if r.name == "quantize")
    gm = result.model
    calls = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLinear)
    ]
    assert len(plan.edits) == 7 and len(calls) == 7  # the second block's q, k, v, o, gate, up, down
    assert all(list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.1.") for n in calls)


def test_selector_keys_are_checked():
    with pytest.raises(ConfigError, match=r"recipe key 'exclude': expected a list of name globs or roles"):
        get_recipe(_recipe(exclude=[3]))
    r = get_recipe(_recipe(exclude="output_head"))
    assert r.layers.exclude == ("output_head",)
    assert get_recipe(r.to_dict()).layers == r.layers  # round-trips through the recipe file form


def test_first_and_last_block_roles_are_the_end_layers_on_both_graph_kinds(llama_case, onnx_dir):
    """Found from structure (sublayers grouped at each attention): layer 0's and the last layer's
    seven linears (q, k, v, o, gate, up, down), the same positions on torch.fx and ONNX.
    """
    picked = {}
    for backend in ("fx", "onnx"):
        view = llama_case.view(backend, onnx_dir)
        linears = list(view.ops(frozenset({OpKind.LINEAR})))
        for role in ("first_block", "last_block"):
            selector = Selector(view, LayerSelection(only=(role,)))
            picked[backend, role] = [i for i, op in enumerate(linears) if not selector.skip_reason(op)]
        if backend == "fx":
            scopes = {role: {view.scope(linears[i]).split(".")[1] for i in picked["fx", role]} for role in
                      ("first_block", "last_block")}  # fmt: skip
            n_layers = len(llama_case.model.layers)
            assert scopes == {"first_block": {"0"}, "last_block": {str(n_layers - 1)}}
    for role in ("first_block", "last_block"):
        assert len(picked["fx", role]) == 7 and picked["fx", role] == picked["onnx", role]
