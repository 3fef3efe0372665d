"""What the command line is given, turned into library objects: models and data.

A model is an ``.onnx`` file, a saved quantized torch program (``.pt2``, written by
``qpass quantize``), or an importable ``module:factory`` that returns an ``nn.Module``.
Data is an ``.npz`` file (one array per model input, batch on axis 0), a folder of
``.npz``/``.npy`` files, or a text file with one sample a line plus a tokenizer. An ``.npz``
whose arrays do not share axis 0 (a scalar, a per-channel parameter) is one feed, run as is;
with ``--feeds`` every file is one feed (`qpass.data.Feeds`), never split. Text is
tokenized in batches padded to their own longest sample, so the attention mask marks
padding and calibration skips it (padded rows would otherwise wreck static ranges).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpass.data import Feeds, leading_size, load_npz, split_rows
from qpass.errors import CalibrationError, ConfigError, ModelLoadError

TEXT_SUFFIXES = (".txt", ".text")
TOKENIZERS = ("minilm", "smollm2")  # shipped tokenizers; a folder with a HF tokenizer also works
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# ----------------------------------------------------------------------------- models
def is_onnx_path(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def is_program_path(spec: str) -> bool:
    return spec.lower().endswith(".pt2")


def is_factory(spec: str) -> bool:
    """`package.module:function` (and not an existing file)."""
    return bool(_FACTORY.match(spec)) and not Path(spec).exists()


def check_model_spec(spec: str) -> None:
    """Fail early with a clear line when a model argument is neither a file we read nor a factory."""
    if is_onnx_path(spec) or is_program_path(spec) or is_factory(spec):
        return
    msg = (
        f"{spec}: not a model qpass reads; give an .onnx file, a .pt2 written by `qpass quantize`, "
        "or an importable 'module:factory' returning an nn.Module"
    )
    raise ConfigError(msg)


def load_factory(spec: str) -> torch.nn.Module:
    """Import `module:factory` and call it; the result must be an nn.Module (put in eval mode)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"{spec}: cannot import module '{module_name}' ({exc}); is it on PYTHONPATH?"
        raise ModelLoadError(msg) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        msg = f"{spec}: module '{module_name}' has no callable '{attr}'"
        raise ModelLoadError(msg)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        msg = f"{spec}: the factory returned a {type(model).__name__}, expected a torch.nn.Module"
        raise ModelLoadError(msg)
    return model.eval()


def load_program(path: str | os.PathLike) -> torch.nn.Module:
    """A `.pt2` written by `qpass quantize` (torch.export.save), as a callable module."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such .pt2 file"
        raise ModelLoadError(msg)
    try:
        from qpass.registry import register_qpass_ops

        register_qpass_ops()  # a quantized program calls qpass::* kernels: register them first
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch.export.load raises many types; name the file
        msg = f"{path}: not a readable torch.export program ({type(exc).__name__})"
        raise ModelLoadError(msg) from exc
    return program.module()


def torch_input_names(model: torch.nn.Module) -> list[str]:
    """The names of `forward`'s tensor arguments (what calibration arrays must be called)."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# ----------------------------------------------------------------------------- example inputs
@dataclass(frozen=True)
class InputSpec:
    """One example input for torch.export: `name:DIMxDIM[:dtype]`, e.g. `input_ids:1x128:int64`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def example(self) -> torch.Tensor:
        """Zeros for integer inputs (valid token ids, a full mask is set below), normal noise for floats."""
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=torch.Generator().manual_seed(0)).to(self.dtype)
        if "mask" in self.name:
            return torch.ones(self.shape, dtype=self.dtype)
        return torch.zeros(self.shape, dtype=self.dtype)


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def parse_input_spec(text: str) -> InputSpec:
    """`name:2x16x64` or `name:1x128:int64` (dtype defaults to float32)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        msg = f"--input {text!r}: expected NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64"
        raise ConfigError(msg)
    try:
        shape = tuple(int(d) for d in parts[1].lower().split("x"))
    except ValueError:
        msg = f"--input {text!r}: shape {parts[1]!r} is not dims joined by 'x', e.g. 1x128"
        raise ConfigError(msg) from None
    if any(d < 1 for d in shape):
        msg = f"--input {text!r}: every dim must be >= 1"
        raise ConfigError(msg)
    dtype_name = parts[2] if len(parts) == 3 else "float32"
    if dtype_name not in _DTYPES:
        msg = f"--input {text!r}: unknown dtype {dtype_name!r}; known: {', '.join(_DTYPES)}"
        raise ConfigError(msg)
    return InputSpec(parts[0], shape, _DTYPES[dtype_name])


def example_inputs(specs: Sequence[InputSpec], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keyword example inputs for `model.forward`, checked against its argument names."""
    names = torch_input_names(model)
    unknown = [s.name for s in specs if s.name not in names]
    if unknown:
        msg = f"--input {unknown[0]!r}: {type(model).__name__}.forward has no such argument; it takes {names}"
        raise ConfigError(msg)
    return {s.name: s.example() for s in specs}


# ----------------------------------------------------------------------------- data
def load_tokenizer(name: str) -> Any:
    """A shipped tokenizer by name ('minilm', 'smollm2') or a local Hugging Face tokenizer folder."""
    if name == "minilm":
        from qpass import zoo

        return zoo.load_minilm_tokenizer()
    if name == "smollm2":
        from qpass import zoo

        return zoo.load_smollm2()[1]
    if Path(name).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            msg = f"{name}: not a readable tokenizer folder ({exc})"
            raise ConfigError(msg) from None
    msg = f"--tokenizer {name!r}: expected one of {', '.join(TOKENIZERS)} or a tokenizer folder"
    raise ConfigError(msg)


def read_text_samples(path: Path) -> list[str]:
    """One sample a line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read text samples ({exc})"
        raise CalibrationError(msg) from None
    samples = [ln.strip() for ln in lines if ln.strip()]
    if not samples:
        msg = f"{path}: the text file holds no samples (one per line)"
        raise CalibrationError(msg)
    return samples


def tokenize(tokenizer: Any, samples: Sequence[str], batch_size: int, max_len: int) -> list[dict]:
    """Batches of int64 `input_ids` and `attention_mask`, each padded to its own longest sample."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # causal-LM tokenizers ship without a pad token
    out = []
    for i in range(0, len(samples), batch_size):
        enc = tokenizer(
            list(samples[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        out.append({k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")})
    return out


def _load_array_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        return load_npz(path)
    try:
        return {path.stem: np.load(path, allow_pickle=False)}
    except Exception as exc:  # noqa: BLE001 - numpy raises many types on a bad file
        msg = f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})"
        raise CalibrationError(msg) from None


def load_data(
    source: str | os.PathLike, *, tokenizer: str | None = None, batch_size: int = 8, max_len: int = 128
) -> list[dict[str, np.ndarray]]:
    """Samples as a list of {input name: array} chunks (batch on axis 0).

    A folder: every `.npz` is one chunk; `.npy` files are one input each (named by the file stem)
    and together make one chunk. A text file needs `tokenizer`.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            msg = f"{path}: the folder holds no .npz or .npy files"
            raise CalibrationError(msg)
        chunks = [_load_array_file(p) for p in files if p.suffix == ".npz"]
        loose = {p.stem: _load_array_file(p)[p.stem] for p in files if p.suffix == ".npy"}
        return chunks + ([loose] if loose else [])
    if not path.is_file():
        msg = f"{path}: no such calibration file"
        raise CalibrationError(msg)
    if path.suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            msg = f"{path}: text data needs --tokenizer ({', '.join(TOKENIZERS)} or a tokenizer folder)"
            raise CalibrationError(msg)
        return tokenize(load_tokenizer(tokenizer), read_text_samples(path), batch_size, max_len)
    if path.suffix not in (".npz", ".npy"):
        msg = f"{path}: unknown data format; give an .npz, a folder of .npz/.npy, or a .txt with --tokenizer"
        raise CalibrationError(msg)
    return [_load_array_file(path)]


def chunk_origins(source: str | os.PathLike, chunks: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """What to call each chunk of `load_data` in errors: its file, or the text file's batch."""
    path = Path(source)
    if path.is_dir():
        names = [str(p) for p in sorted(path.iterdir()) if p.suffix == ".npz"]
        if len(chunks) > len(names):
            names.append(f"{path} (.npy files)")
        return names
    return [str(path)] if len(chunks) == 1 else [f"{path} batch {i}" for i in range(len(chunks))]


def as_feeds(
    source: str | os.PathLike, chunks: Sequence[Mapping[str, np.ndarray]], *, split: bool = False
) -> Feeds:
    """`--feeds`: every chunk of `load_data` is one feed, run as is; each named by its file.

    `split=True`: the chunks keep the default reading (sample sets cut into batches), named too.
    """
    return Feeds([dict(c) for c in chunks], chunk_origins(source, chunks), split=split)


def count_samples(chunks: Sequence[Mapping[str, np.ndarray]], feeds: bool = False) -> int:
    """Samples in the chunks: a chunk without one shared axis-0 size (or any chunk, with feeds) is one."""
    if feeds:
        return len(chunks)
    return sum(leading_size(c) or 1 for c in chunks if c)


def keyword_batches(
    chunks: Sequence[Mapping[str, np.ndarray]],
    model: torch.nn.Module,
    batch_size: int,
    origin: str,
    feeds: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Keyword batches for `model.forward` from data chunks, names checked against its arguments.

    A chunk whose arrays share axis 0 is cut into batches of `batch_size` rows; any other chunk
    (or every chunk, with `feeds`) is one batch, run as is.
    """
    names = torch_input_names(model)
    out = []
    for chunk in chunks:
        unknown = sorted(set(chunk) - set(names))
        if unknown:
            msg = (
                f"{origin}: array '{unknown[0]}' is not an argument of {type(model).__name__}.forward {names}"
            )
            raise CalibrationError(msg)
        rows = [dict(chunk)] if feeds else split_rows(chunk, batch_size)
        out += [{k: torch.from_numpy(np.asarray(a)) for k, a in b.items()} for b in rows]
    return out
