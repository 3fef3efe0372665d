"""ONNX Runtime GenAI model folders: read and check one, and write its quantized copy.

A GenAI folder (what `onnxruntime_genai.models.builder` writes, what `og.Model(folder)` loads) holds
`genai_config.json`, the decoder `.onnx` it names (with its external data) and the tokenizer files.
qpass quantizes the decoder and writes a new folder: the same files, the decoder replaced, the
config rewritten only where the decoder's inputs or outputs or its file name changed. The input
folder is only read; the output appears at once (`qpass.io.atomic_folder`) or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from qpass.errors import ModelLoadError

CONFIG_NAME = "genai_config.json"
TOKENIZER_NAME = "tokenizer.json"


@dataclass(frozen=True)
class CacheLayout:
    """The decoder's KV cache as genai_config.json names it: per-layer input/output name templates
    ('%d' = layer index) and the per-layer tensor [batch, kv_heads, length, head_size].
    """

    layers: int
    kv_heads: int
    head_size: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    def past_names(self) -> list[str]:
        return [t % i for i in range(self.layers) for t in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [t % i for i in range(self.layers) for t in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class GenAIFolder:
    """A checked GenAI folder: its path, parsed config, decoder file and cache layout."""

    path: Path
    config: dict[str, Any]
    decoder: Path
    cache: CacheLayout
    input_names: dict[str, str]  # genai role (input_ids, attention_mask, position_ids) -> graph input
    logits: str

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_NAME


def is_genai_folder(source: Any) -> bool:
    """A path to a folder holding genai_config.json."""
    return isinstance(source, (str, os.PathLike)) and (Path(source) / CONFIG_NAME).is_file()


def _key(config: dict[str, Any], path: Path, *keys: str) -> Any:
    node: Any = config
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            msg = f"{path}: missing key '{'.'.join(keys)}'"
            raise ModelLoadError(msg)
        node = node[k]
    return node


def load_genai_folder(folder: str | os.PathLike) -> GenAIFolder:
    """Read and check a GenAI folder; a one-line `ModelLoadError` naming the file that is wrong."""
    path = Path(folder)
    if not path.is_dir():
        msg = f"{path}: no such GenAI model folder"
        raise ModelLoadError(msg)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        msg = f"{cfg_path}: not found (an ONNX Runtime GenAI model folder holds one)"
        raise ModelLoadError(msg)
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{cfg_path}: not readable JSON ({exc})"
        raise ModelLoadError(msg) from exc
    dec = _key(config, cfg_path, "model", "decoder")
    filename = _key(config, cfg_path, "model", "decoder", "filename")
    decoder = path / filename
    if Path(filename).is_absolute() or path.resolve() not in decoder.resolve().parents:
        msg = f"{cfg_path}: model.decoder.filename '{filename}' points outside the folder"
        raise ModelLoadError(msg)
    if not decoder.is_file():
        msg = f"{decoder}: the decoder named by {CONFIG_NAME} (model.decoder.filename) does not exist"
        raise ModelLoadError(msg)
    inputs = _key(config, cfg_path, "model", "decoder", "inputs")
    outputs = _key(config, cfg_path, "model", "decoder", "outputs")
    cache = CacheLayout(
        layers=int(_key(config, cfg_path, "model", "decoder", "num_hidden_layers")),
        kv_heads=int(
            dec.get("num_key_value_heads", _key(config, cfg_path, "model", "decoder", "num_attention_heads"))
        ),
        head_size=int(_key(config, cfg_path, "model", "decoder", "head_size")),
        past_key=str(_key(config, cfg_path, "model", "decoder", "inputs", "past_key_names")),
        past_value=str(_key(config, cfg_path, "model", "decoder", "inputs", "past_value_names")),
        present_key=str(_key(config, cfg_path, "model", "decoder", "outputs", "present_key_names")),
        present_value=str(_key(config, cfg_path, "model", "decoder", "outputs", "present_value_names")),
    )
    for rel in sorted(_decoder_files(path, decoder)):
        if not (path / rel).is_file():
            msg = f"{path / rel}: missing (external data of {decoder.name}, named in {CONFIG_NAME})"
            raise ModelLoadError(msg)
    roles = {k: str(v) for k, v in inputs.items() if not k.endswith("_names") and isinstance(v, str)}
    return GenAIFolder(path, config, decoder, cache, roles, str(outputs.get("logits", "logits")))


def _decoder_files(folder: Path, decoder: Path) -> set[str]:
    """The decoder file and the external data files it reads (relative to the folder)."""
    try:
        proto = onnx.load(str(decoder), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        msg = f"{decoder}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        raise ModelLoadError(msg) from exc
    files = {decoder.relative_to(folder).as_posix()}
    decoder_dir = decoder.parent.relative_to(folder)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add((decoder_dir / entry.value).as_posix())
    return files


def updated_config(folder: GenAIFolder, graph_inputs: list[str], graph_outputs: list[str]) -> dict[str, Any]:
    """The config for the quantized decoder: an input or output role the decoder no longer has is
    dropped, one it newly needs is refused (GenAI would not feed it); the rest is kept as written.
    """
    config = json.loads(json.dumps(folder.config))
    dec = config["model"]["decoder"]
    for section, present in (("inputs", graph_inputs), ("outputs", graph_outputs)):
        names = set(present)
        for role, name in list(dec[section].items()):
            if role.endswith("_names"):
                needed = {name % i for i in range(folder.cache.layers)}
                if not needed <= names:
                    msg = f"quantized decoder lost cache {section} '{name}' that {CONFIG_NAME} names"
                    raise ModelLoadError(msg)
            elif name not in names:
                del dec[section][role]
    known = {v for k, v in dec["inputs"].items() if not k.endswith("_names")} | set(folder.cache.past_names())
    extra = [n for n in graph_inputs if n not in known]
    if extra:
        msg = f"quantized decoder has input '{extra[0]}' that {CONFIG_NAME} does not feed"
        raise ModelLoadError(msg)
    return config


def copy_folder_rest(folder: GenAIFolder, dst: Path, config: dict[str, Any]) -> None:
    """Everything but the decoder and its data into `dst` (tokenizer, chat template, other models),
    and the rewritten config.
    """
    skip = _decoder_files(folder.path, folder.decoder) | {CONFIG_NAME}
    for item in sorted(folder.path.rglob("*")):
        rel = item.relative_to(folder.path).as_posix()
        if rel in skip or item.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, target)
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n")
