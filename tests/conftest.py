"""Shared fixtures: small LLaMA-like and BERT/OPT-like graphs with injected outliers, in torch.fx
and ONNX form, and a `backend` parameter so each pass test runs on both graph kinds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The repo root holds folders (`kernels/`, `passes/`, `lowering/`) that install as `qpass.*`; on
# sys.path they would shadow installed distributions of those names (Hugging Face's `kernels`, which
# transformers imports). The README runs `python -P -m pytest`; this guard keeps a plain
# `python -m pytest` honest too, and PYTHONSAFEPATH carries it into xdist workers and CLI subprocesses.
_REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]
os.environ["PYTHONSAFEPATH"] = "1"
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# xdist workers share the cores: each takes its share of intra-op threads (torch, and through
# qpass.threads ONNX Runtime), and CLI subprocesses inherit it; oversubscribed OpenMP/ORT threads
# spin against each other and made the suite's heaviest tests 2-3x slower on 2 cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
if not torch.cuda.is_available():  # Triton kernels reach CPU tensors only through its interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when kernels are decorated (import time)

from models import TinyBert, TinyLlama, bert_inputs, inject_outliers, llama_inputs  # noqa: E402

from qpass.graph.fx import FxGraphView  # noqa: E402
from qpass.graph.fx_capture import capture, clone_graph_module  # noqa: E402
from qpass.graph.onnx import OnnxGraphView  # noqa: E402
from qpass.graph.onnx_load import load_model  # noqa: E402

torch.manual_seed(0)


class Case:
    """One test model in torch form, with calibration batches and its ONNX export on demand."""

    def __init__(self, name: str, model: torch.nn.Module, batches: list, input_names: list[str]) -> None:
        self.name = name
        self.model = model
        self.batches = batches
        self.input_names = input_names
        self._onnx_path: Path | None = None

    def torch_args(self, batch) -> tuple:
        return tuple(batch[n] for n in self.input_names) if isinstance(batch, dict) else (batch,)

    def reference(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return self.model(*self.torch_args(batch))

    def onnx_feed(self, batch) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in zip(self.input_names, self.torch_args(batch), strict=True)}

    def onnx_calib(self) -> dict[str, np.ndarray]:
        feeds = [self.onnx_feed(b) for b in self.batches]
        return {n: np.concatenate([f[n] for f in feeds]) for n in self.input_names}

    def onnx_path(self, folder: Path) -> Path:
        if self._onnx_path is None:
            path = folder / f"{self.name}.onnx"
            example = self.torch_args(self.batches[0])
            dyn = tuple({0: "batch", 1: "seq"} for _ in example)
            prog = torch.onnx.export(
                self.model,
                example,
                input_names=self.input_names,
                output_names=["y"],
                dynamo=True,
                dynamic_shapes=dyn,
                verbose=False,
            )
            prog.save(str(path))
            self._onnx_path = path
        return self._onnx_path

    def view(self, backend: str, folder: Path):
        if backend == "fx":
            return FxGraphView(clone_graph_module(capture(self.model, self.batches[0])))
        return OnnxGraphView(load_model(self.onnx_path(folder)))

    def batches_for(self, backend: str) -> list:
        return self.batches if backend == "fx" else [self.onnx_feed(b) for b in self.batches]


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


@pytest.fixture(scope="session")
def llama_case() -> Case:
    torch.manual_seed(0)  # the same weights whichever tests ran first in this worker
    model = inject_outliers(TinyLlama())
    return Case("tiny_llama", model, [llama_inputs(seed=i) for i in range(4)], ["x"])


@pytest.fixture(scope="session")
def bert_case() -> Case:
    torch.manual_seed(0)
    model = inject_outliers(TinyBert())
    return Case("tiny_bert", model, [bert_inputs(seed=i) for i in range(4)], ["x", "mask"])


@pytest.fixture(params=["fx", "onnx"])
def backend(request) -> str:
    return request.param


@pytest.fixture(params=["llama", "bert"])
def case(request, llama_case, bert_case) -> Case:
    return llama_case if request.param == "llama" else bert_case


# ------------------------------------------------------------------ the real CNN (EfficientNet-Lite2)
@pytest.fixture(scope="session")
def efficientnet_onnx(tmp_path_factory):
    """EfficientNet-Lite2 exported once per session (BatchNorm folded), with its FP32 module."""
    from qpass.zoo.efficientnet import export_efficientnet_onnx, load_efficientnet_lite2

    model = load_efficientnet_lite2(copy_model=False)
    path = tmp_path_factory.mktemp("efficientnet") / "lite2.onnx"
    return export_efficientnet_onnx(model, str(path)), model


@pytest.fixture(scope="session")
def photo_crops():
    """Calibration crops (4 batches of 8) and 32 evaluation crops from disjoint photos."""
    from qpass.zoo.images import photo_batch

    calib = photo_batch("calib", 32, seed=1).numpy()
    return [{"x": calib[i : i + 8]} for i in range(0, 32, 8)], photo_batch("eval", 32, seed=2).numpy()
