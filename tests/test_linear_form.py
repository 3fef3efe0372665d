"""One classification of quantized linears (`qpass.quant.linear_form`) for both lowerings.

The torch and ONNX lowerings once tested a QLinear's optional parts in opposite orders; now both
call `linear_form`, and a combination no lowering implements is refused there with the node named.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qpass.errors import UnsupportedOpError
from qpass.graph.onnx import OnnxGraphView
from qpass.graph.refs import ConstRef, OpKind, OpRef, WeightRef
from qpass.lowering.onnxruntime import lower_linear_onnx
from qpass.lowering.torch_backend import LinearKernel, select_kernel
from qpass.quant.linear_form import LinearForm, linear_form
from qpass.quant.qlinear import QLinear

OUT, IN = 8, 16


def _qlinear(**extra) -> QLinear:
    """A symmetric INT8 per-channel linear (weight stored [in, out], as an ONNX MatMul's)."""
    torch.manual_seed(0)
    return QLinear(
        weight=WeightRef(ConstRef("w", (IN, OUT)), in_axis=0, out_axis=1),
        codes=torch.randint(-127, 128, (OUT, IN), dtype=torch.int8),
        scales=torch.rand(OUT, 1) + 0.1,
        zero_points=None,
        g_idx=None,
        group_size=None,
        bits=8,
        act=None,
        act_qparams=None,
        **extra,
    )


def test_each_form_is_named_once():
    q = _qlinear()
    assert linear_form(q) is LinearForm.INTEGER
    assert linear_form(dataclasses.replace(q, codes=None, scales=None)) is LinearForm.FLOAT_WEIGHT
    lorc = dataclasses.replace(q, lorc_u=torch.zeros(OUT, 2), lorc_v=torch.zeros(2, IN))
    assert linear_form(lorc) is LinearForm.CORRECTED
    decomposed = dataclasses.replace(q, fp_channels=torch.tensor([3]), fp_weight=torch.zeros(OUT, 1))
    assert linear_form(decomposed) is LinearForm.DECOMPOSED
    assert select_kernel(q) is LinearKernel.REFERENCE  # int8 weight-only: no W8A8 kernel without activations


def test_unlowered_combination_is_refused_by_both_lowerings():
    q = _qlinear()
    both = dataclasses.replace(
        q,
        lorc_u=torch.zeros(OUT, 2),
        lorc_v=torch.zeros(2, IN),
        fp_channels=torch.tensor([3]),
        fp_weight=torch.zeros(OUT, 1),
    )
    with pytest.raises(UnsupportedOpError, match="node 'mm'.*LLM.int8 decomposition with LoRC"):
        linear_form(both, "mm")
    with pytest.raises(UnsupportedOpError, match="LLM.int8 decomposition with LoRC"):
        select_kernel(both)

    x = ir.Value(name="x", shape=ir.Shape([2, IN]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.zeros((IN, OUT), np.float32), name="w"))
    mm = ir.node("MatMul", [x, w], name="mm")
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 17}, name="g")
    view = OnnxGraphView(ir.Model(graph, ir_version=9))
    op = OpRef("mm", OpKind.LINEAR, "MatMul")
    with pytest.raises(UnsupportedOpError, match="node 'mm'.*LLM.int8 decomposition with LoRC"):
        lower_linear_onnx(view, op, both)
    assert [n.op_type for n in view.model.graph] == ["MatMul"]  # refused before any edit
