"""A `QLinear` as plain data and named tensors, for checkpoints: JSON-able metadata plus tensors
that safetensors stores (no pickle). Integer codes of 1-7 bits are stored packed
(`qpass.formats.packing`), so a 4-bit weight costs half a byte per value on disk.

Loading rebuilds the very QLinear the quantize stage made, so the modules built from it compute
bit-identical results to the ones that were saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from qpass.errors import ModelLoadError
from qpass.formats.packing import pack_bits, unpack_bits
from qpass.formats.spec import QuantSpec
from qpass.graph.refs import ConstRef, WeightRef
from qpass.qconfig import ActGranularity, ActivationQuantConfig
from qpass.quant.qlinear import ActQParams, QLinear

_TENSOR_FIELDS = (
    "scales", "zero_points", "g_idx", "lorc_u", "lorc_v", "outlier_rows", "outlier_cols", "outlier_values",
    "fp_channels", "fp_weight",
)  # fmt: skip


def qlinear_to_state(q: QLinear) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of `q`; the tensors' keys are field names ("codes" packed when narrow)."""
    tensors = {f: getattr(q, f).contiguous() for f in _TENSOR_FIELDS if getattr(q, f) is not None}
    meta: dict[str, Any] = {
        "weight": {
            "const": q.weight.const.name,
            "shape": list(q.weight.const.shape),
            "in_axis": q.weight.in_axis,
            "out_axis": q.weight.out_axis,
        },
        "bits": q.bits,
        "group_size": q.group_size,
        "group_axis": q.group_axis,
        "tensor_scale": q.tensor_scale,
        "spec": None if q.spec is None else q.spec.to_dict(),
        "act": None
        if q.act is None
        else {**dataclasses.asdict(q.act), "granularity": q.act.granularity.value},
        "act_qparams": None if q.act_qparams is None else dataclasses.asdict(q.act_qparams),
        "codes": None,
    }
    if q.codes is not None:
        codes = q.codes
        packed = q.integer_weight and q.bits < 8
        meta["codes"] = {
            "shape": list(codes.shape),
            "dtype": str(codes.dtype).removeprefix("torch."),
            "packed": packed,
        }
        if packed:  # two's complement (or unsigned) low bits, unpacked and sign-extended on load
            tensors["codes"] = pack_bits(
                codes.to(torch.int16).bitwise_and((1 << q.bits) - 1).to(torch.uint8), q.bits
            )
        else:
            tensors["codes"] = codes.contiguous()
    return meta, tensors


def qlinear_from_state(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> QLinear:
    """The QLinear `qlinear_to_state` described (`where` names the module in errors)."""
    try:
        w = meta["weight"]
        weight = WeightRef(ConstRef(w["const"], tuple(w["shape"])), w["in_axis"], w["out_axis"])
        codes = None
        if meta["codes"] is not None:
            c = meta["codes"]
            dtype = getattr(torch, c["dtype"])
            codes = tensors["codes"]
            if c["packed"]:
                n = 1
                for d in c["shape"]:
                    n *= d
                raw = unpack_bits(codes, meta["bits"], n).to(torch.int16)
                if dtype is torch.int8:  # sign-extend the low bits
                    half = 1 << (meta["bits"] - 1)
                    raw = torch.where(raw >= half, raw - (1 << meta["bits"]), raw)
                codes = raw.to(dtype).reshape(c["shape"])
        act = meta["act"]
        act_cfg = (
            None
            if act is None
            else ActivationQuantConfig(**{**act, "granularity": ActGranularity(act["granularity"])})
        )
        qp = meta["act_qparams"]
        return QLinear(
            weight=weight,
            codes=codes,
            act=act_cfg,
            act_qparams=None if qp is None else ActQParams(**qp),
            bits=meta["bits"],
            group_size=meta["group_size"],
            group_axis=meta["group_axis"],
            tensor_scale=meta["tensor_scale"],
            spec=None if meta["spec"] is None else QuantSpec.from_dict(meta["spec"]),
            **{f: tensors.get(f) for f in _TENSOR_FIELDS},
        )
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"{where}: stored quantized linear is incomplete or invalid ({type(exc).__name__}: {exc})"
        raise ModelLoadError(msg) from exc
