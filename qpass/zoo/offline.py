"""No network at run time: the zoo's loaders point the Hugging Face libraries at installed files only."""

from __future__ import annotations

import os


def offline() -> None:
    """Set the hub and transformers offline flags before any transformers import."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
