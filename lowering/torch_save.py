"""Write and read a lowered torch program as one `.pt2` file: the program and its packed weights
(INT8 codes, packed INT4 nibbles, scales, zero points); loading needs neither the model's class nor
calibration data.

The file is a `torch.export` program (`torch.export.save`), so it loads with the stable PT2
format instead of pickled Python objects. While exporting, each `QuantLinear` runs in
`packed_only` mode: its forward reads only the quantized state, so the float weight cache is
not written. What else travels in the archive (the recipe, as JSON in its extra files) is the
app's business: `qpass.saved_model` adds it and reaches these functions through `qpass.registry`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch

from qpass.errors import ModelLoadError
from qpass.graph.fx_capture import all_dims_auto, split_batch
from qpass.lowering.torch_backend import LinearKernel, QuantLinear
from qpass.lowering.torch_conv import QuantConv


def register_qpass_ops() -> None:
    """Register the qpass::* custom ops a saved quantized program may call."""
    import qpass.kernels.hadamard  # noqa: F401 - the qpass::* ops a saved program calls
    import qpass.kernels.int8_decomp  # noqa: F401
    import qpass.kernels.mx_gemm  # noqa: F401
    import qpass.kernels.w4a16  # noqa: F401
    import qpass.kernels.w8a8  # noqa: F401


def _not_read_when_packed(m: QuantLinear | QuantConv) -> list[str]:
    """Buffers a packed-only forward does not read (torch.export would write them all)."""
    if isinstance(m, QuantConv):
        return ["_weight"] if m.weight_codes is not None else []
    names = []
    if m.weight_codes is not None:
        names.append("_weight")  # the float cache
    if m.kernel is not LinearKernel.REFERENCE:
        names.append("weight_codes")  # the kernels read their own layout (_w_kn, _packed)
    return names


@contextmanager
def _packed_only(model: torch.nn.Module):
    mods = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv))]
    stashed = []
    for m in mods:
        m.packed_only = True
        stashed.append({n: m._buffers.pop(n) for n in _not_read_when_packed(m)})
    try:
        yield
    finally:
        for m, bufs in zip(mods, stashed, strict=True):
            m.packed_only = False
            m._buffers.update(bufs)


def export_program(
    model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any, extra_files: dict[str, str] | None = None
) -> None:
    """Export `model` (lowered `QuantLinear` modules) on `example_inputs` and write it with `extra_files`."""
    register_qpass_ops()
    args, kwargs = split_batch(example_inputs)
    with _packed_only(model), torch.no_grad():
        try:
            ep = torch.export.export(
                model, args, kwargs, dynamic_shapes=all_dims_auto(model, args, kwargs), strict=False
            )
        except Exception:  # noqa: BLE001 - models with fixed shapes export without dynamic dims
            ep = torch.export.export(model, args, kwargs, strict=False)
    torch.export.save(ep, os.fspath(path), extra_files=extra_files or {})


def read_program(path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> torch.nn.Module:
    """The runnable module `export_program` wrote; `extra_files` (names to "") is filled in place."""
    register_qpass_ops()
    if not os.path.isfile(path):
        msg = f"{os.fspath(path)}: no such quantized model file"
        raise ModelLoadError(msg)
    try:
        ep = torch.export.load(os.fspath(path), extra_files=extra_files if extra_files is not None else {})
    except Exception as exc:  # the archive reader raises many types; name the file and the cause
        msg = f"{os.fspath(path)}: not a qpass .pt2 model ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        raise ModelLoadError(msg) from exc
    return ep.module()
