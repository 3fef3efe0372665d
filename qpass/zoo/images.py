"""Real photos for the CNN tests and benchmarks: the images the scikit-image wheel ships in
`skimage/data`, which scripts/install.sh extracts (only those files) into
`sys.prefix/qpass-models/skimage-data/`. Nothing is downloaded at run time.

Calibration and evaluation draw from disjoint photos (a quantizer calibrated on the very pixels
it is scored on would flatter itself); within a split, each image is a seeded random crop of a
random scale of one photo, flipped half the time, so a handful of photos give many distinct inputs.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from qpass.errors import ModelLoadError

IMAGES_DIR = "skimage-data"

# Natural photos only (no charts, text pages, synthetic phantoms). motorcycle_left/right are one
# scene from two viewpoints, so they stay in the same split.
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "coins", "brick", "grass")
EVAL_PHOTOS = ("chelsea", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "retina", "ihc",
               "moon", "gravel", "clock_motion", "color")
SPLITS = {"calib": CALIB_PHOTOS, "eval": EVAL_PHOTOS}


@dataclass(frozen=True)
class ImageSpec:
    """How photos become network inputs: a square `size` crop, then (x / 255 - mean) / std per channel.

    The defaults are EfficientNet-Lite's (the TF-Lite models take (x - 127) / 128).
    """

    size: int = 260
    mean: tuple[float, float, float] = (127.0 / 255,) * 3
    std: tuple[float, float, float] = (128.0 / 255,) * 3
    min_scale: float = 1.0  # the crop covers between min_scale and max_scale of the short side
    max_scale: float = 1.6


def images_dir() -> str:
    """Where scripts/install.sh put the photos."""
    path = os.path.join(sys.prefix, "qpass-models", IMAGES_DIR)
    if not os.path.isfile(os.path.join(path, "chelsea.png")):
        msg = f"photos: {path} has no chelsea.png (scripts/install.sh extracts skimage/data from the wheel)"
        raise ModelLoadError(msg)
    return path


@functools.lru_cache(maxsize=32)
def photo(name: str) -> np.ndarray:
    """One photo as uint8 RGB [H, W, 3] (grayscale photos repeated over the channels)."""
    from PIL import Image

    folder = images_dir()
    for ext in (".png", ".jpg"):
        path = os.path.join(folder, name + ext)
        if os.path.isfile(path):
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    msg = f"photo '{name}': no {name}.png or {name}.jpg in {folder}"
    raise ModelLoadError(msg)


def _crop(img: np.ndarray, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w) / rng.uniform(spec.min_scale, spec.max_scale)
    side = max(int(side), 16)
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = Image.fromarray(img[top : top + side, left : left + side])
    out = np.asarray(patch.resize((spec.size, spec.size), Image.BILINEAR), dtype=np.float32)
    return out[:, ::-1] if rng.random() < 0.5 else out


def photo_batch(split: str, n: int, seed: int = 0, spec: ImageSpec = ImageSpec()) -> torch.Tensor:
    """`n` normalised crops [n, 3, size, size] float32 from the split's photos, in turn (photo i % k)."""
    if split not in SPLITS:
        msg = f"photo split '{split}': expected one of {sorted(SPLITS)}"
        raise ValueError(msg)
    names = SPLITS[split]
    rng = np.random.default_rng([seed, len(split)])
    crops = np.stack([_crop(photo(names[i % len(names)]), spec, rng) for i in range(n)])
    x = torch.from_numpy(crops / 255.0).permute(0, 3, 1, 2).float()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
