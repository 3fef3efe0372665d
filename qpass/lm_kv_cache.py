"""KV-cache quantization for transformers LMs quantized by qpass: the recipe's `kv_cache:` section,
applied inside the cache while the model generates.

`kv_cache: {format: int8|int4|fp8_e4m3, k_granularity: per_channel|per_token, v_granularity:
per_token|per_channel, rotate: none|hadamard, residual: 32, group: 32}`:
- the `residual` most recent tokens stay in float; older ones are quantized as they leave that
  window (KIVI's float residual);
- per-token: one scale per token and head over the head dimension; per-channel: one scale per
  channel over each group of `group` tokens (KIVI's keys: their outlier channels get their own
  scales);
- `rotate: hadamard` quantizes keys in a Hadamard-rotated basis over the head dimension and rotates
  them back (RotateKV / QuaRot on K): QKᵀ needs no change, the channel outliers are spread first.
Stored as codes: each quantized chunk of history is kept bit-packed (`PackedTensor`: int4 two to a
byte, int8 and fp8 one, plus float32 scales and zero points) and decoded when attention reads it,
one layer at a time, so the cache holds about a quarter (int8) or an eighth (int4) of a float32
cache's bytes plus the float window (`QuantizedKVCache.nbytes` measures it). The values attention
sees are the dequantized codes: the same numbers a kernel reading codes would use.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qpass.errors import ConfigError
from qpass.formats import Granularity, QuantSpec, get_format
from qpass.formats.packing import PackedTensor
from qpass.math.hadamard import fwht
from qpass.qconfig import KVCacheConfig


def _spec(cfg: KVCacheConfig) -> QuantSpec:
    """One scale per row of a 2-D view (the rows are tokens or channels, see `_to_rows`)."""
    symmetric = cfg.format.startswith("fp") or cfg.symmetric
    return get_format(cfg.format).replace(
        granularity=Granularity.PER_CHANNEL, axis=0, group_size=None, symmetric=symmetric
    )


def _to_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The 2-D rows of x [B, H, T, D] that get one scale each: tokens ("per_token", rows over D)
    or channels ("per_channel", rows over the T tokens given).
    """
    b, h, t, d = x.shape
    if granularity == "per_token":
        return x.float().reshape(-1, d)
    return x.float().transpose(-1, -2).reshape(-1, t)  # [B*H*D, T]


def _from_rows(rows: torch.Tensor, shape: tuple[int, ...], granularity: str) -> torch.Tensor:
    b, h, t, d = shape
    if granularity == "per_token":
        return rows.reshape(b, h, t, d)
    return rows.reshape(b, h, d, t).transpose(-1, -2)


@dataclass
class _Chunk:
    """Tokens of one layer's K or V history, stored bit-packed; decoded when attention reads them."""

    packed: PackedTensor
    shape: tuple[int, ...]  # [B, H, T, D]
    granularity: str
    rotated: bool  # keys in a Hadamard basis over D (rotated back when decoded)
    dtype: torch.dtype

    @classmethod
    def encode(cls, x: torch.Tensor, spec: QuantSpec, granularity: str, rotate: bool) -> _Chunk:
        y = fwht(x.float(), dim=-1) if rotate else x
        packed = spec.quantize(_to_rows(y, granularity)).pack()
        return cls(packed, tuple(x.shape), granularity, rotate, x.dtype)

    def decode(self) -> torch.Tensor:
        x = _from_rows(self.packed.unpack().dequantize(), self.shape, self.granularity)
        return (fwht(x, dim=-1) if self.rotated else x).to(self.dtype)  # H = Hᵀ = H⁻¹ (orthonormal)

    def select(self, index: torch.Tensor) -> _Chunk:
        """The chunk for batch rows `index` (beam search): codes and scales move with their rows."""
        b = self.shape[0]
        qt = self.packed.unpack()
        pick = lambda t: None if t is None else t.reshape(b, -1, *t.shape[1:])[index].reshape(-1, *t.shape[1:])  # noqa: E731
        qt = replace(qt, codes=pick(qt.codes), scale=pick(qt.scale), zero_point=pick(qt.zero_point),
                     scale_bits=pick(qt.scale_bits))  # fmt: skip
        return replace(self, packed=qt.pack(), shape=(int(index.numel()), *self.shape[1:]))


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: bit-packed quantized history plus a float window."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = _spec(cfg)
        self.k_chunks: list[_Chunk] = []
        self.v_chunks: list[_Chunk] = []
        self.window_k: torch.Tensor | None = None
        self.window_v: torch.Tensor | None = None

    def _encode(self, x: torch.Tensor, granularity: str, rotate: bool) -> list[_Chunk]:
        """Per-channel scales cover each group of `group` tokens: one chunk per group."""
        parts = x.split(self.cfg.group, dim=-2) if granularity == "per_channel" else [x]
        return [_Chunk.encode(c, self.spec, granularity, rotate) for c in parts]

    def _flush(self, keep: int) -> None:
        """Quantize all but the last `keep` window tokens (per-channel: whole groups only)."""
        n = self.window_k.shape[-2] - keep
        group = self.cfg.group
        k_chunk = n - n % group if self.cfg.k_granularity == "per_channel" else n
        v_chunk = n - n % group if self.cfg.v_granularity == "per_channel" else n
        chunk = min(k_chunk, v_chunk)
        if chunk <= 0:
            return
        k, v = self.window_k[..., :chunk, :], self.window_v[..., :chunk, :]
        self.k_chunks += self._encode(k, self.cfg.k_granularity, self.cfg.rotate == "hadamard")
        self.v_chunks += self._encode(v, self.cfg.v_granularity, False)
        self.window_k, self.window_v = self.window_k[..., chunk:, :], self.window_v[..., chunk:, :]

    def _history(self, chunks: list[_Chunk], window: torch.Tensor) -> torch.Tensor:
        return torch.cat([*(c.decode() for c in chunks), window], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states[..., :0, :]  # dtype/device for the base class; history is in chunks
            self.values = value_states[..., :0, :]
            self.window_k, self.window_v = key_states, value_states
        else:
            self.window_k = torch.cat([self.window_k, key_states], dim=-2)
            self.window_v = torch.cat([self.window_v, value_states], dim=-2)
        full_k = self._history(self.k_chunks, self.window_k)
        full_v = self._history(self.v_chunks, self.window_v)
        self._flush(self.cfg.residual)  # what later steps read; this step reads its own tokens in float
        return full_k, full_v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(c.shape[-2] for c in self.k_chunks) + self.window_k.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes with their scales, plus the float window."""
        packed = sum(c.packed.nbytes for c in self.k_chunks + self.v_chunks)
        window = sum(w.numel() * w.element_size() for w in (self.window_k, self.window_v) if w is not None)
        return packed + window

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self.window_k.device) if self.window_k is not None else beam_idx
        self.k_chunks = [c.select(index) for c in self.k_chunks]
        self.v_chunks = [c.select(index) for c in self.v_chunks]
        if self.window_k is not None:
            self.window_k = self.window_k.index_select(0, index)
            self.window_v = self.window_v.index_select(0, index)

    def _unsupported(self, what: str) -> None:
        msg = f"the quantized KV cache does not support {what} (recipe key 'kv_cache'); generate without it"
        raise ConfigError(msg)

    def crop(self, max_length: int) -> None:
        self._unsupported("cropping (assisted generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("expanding the batch of a filled cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("selecting batch rows of a filled cache")


class QuantizedKVCache(Cache):
    """A cache of `QuantizedKVLayer`s, one per attention layer (full-attention models)."""

    def __init__(self, config: Any, cfg: KVCacheConfig) -> None:
        text = config.get_text_config(decoder=True)
        types_ = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        if set(types_) - {"full_attention"}:
            msg = f"recipe key 'kv_cache': layers of kind {sorted(set(types_) - {'full_attention'})} are not supported"
            raise ConfigError(msg)
        super().__init__(layers=[QuantizedKVLayer(cfg) for _ in types_])

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds over all layers (packed history plus float windows)."""
        return sum(layer.nbytes for layer in self.layers)


def attach_kv_cache(model: Any, cfg: KVCacheConfig) -> None:
    """`model.generate(...)` builds a `QuantizedKVCache` unless the caller passes its own cache."""
    head_dim = (
        getattr(model.config, "head_dim", None)
        or model.config.hidden_size // model.config.num_attention_heads
    )
    if cfg.rotate == "hadamard" and head_dim & (head_dim - 1):
        msg = f"recipe key 'kv_cache.rotate': hadamard needs a power-of-two head dimension, the model has {head_dim}"
        raise ConfigError(msg)
    generate = type(model).generate

    def quantized_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = QuantizedKVCache(self.config, cfg)
        return generate(self, *args, **kwargs)

    model.generate = types.MethodType(quantized_generate, model)
    model.qpass_kv_cache = cfg
