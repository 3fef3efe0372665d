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
Simulated: the cache holds the dequantized values (what attention reads after a kernel decodes the
codes), so the numbers are those of a quantized cache; the memory saving needs a kernel that reads
codes, which this CPU build does not have.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qpass.errors import ConfigError
from qpass.formats import Granularity, QuantSpec, get_format
from qpass.math.hadamard import fwht
from qpass.qconfig import KVCacheConfig


def _spec(cfg: KVCacheConfig) -> QuantSpec:
    """One scale per row of a 2-D view (the rows are tokens or channels, see `_fake_quant`)."""
    symmetric = cfg.format.startswith("fp") or cfg.symmetric
    return get_format(cfg.format).replace(
        granularity=Granularity.PER_CHANNEL, axis=0, group_size=None, symmetric=symmetric
    )


def _fake_quant(x: torch.Tensor, spec: QuantSpec, granularity: str) -> torch.Tensor:
    """Fake-quantize x [B, H, T, D] with one scale per (token, head) over D ("per_token")
    or per (channel, head) over the T tokens given ("per_channel").
    """
    b, h, t, d = x.shape
    if granularity == "per_token":
        return spec.fake_quantize(x.float().reshape(-1, d)).reshape(b, h, t, d).to(x.dtype)
    rows = x.float().transpose(-1, -2).reshape(-1, t)  # [B*H*D, T]
    return spec.fake_quantize(rows).reshape(b, h, d, t).transpose(-1, -2).to(x.dtype)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantized (then dequantized) history plus a float window."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = _spec(cfg)
        self.window_k: torch.Tensor | None = None
        self.window_v: torch.Tensor | None = None

    def _quantize_k(self, k: torch.Tensor) -> torch.Tensor:
        if self.cfg.rotate == "hadamard":  # x @ H quantized, then @ H again (H = Hᵀ = H⁻¹, orthonormal)
            rotated = fwht(k.float(), dim=-1)
            return fwht(_fake_quant(rotated, self.spec, self.cfg.k_granularity), dim=-1).to(k.dtype)
        return _fake_quant(k, self.spec, self.cfg.k_granularity)

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
        if self.cfg.k_granularity == "per_channel":  # scales per channel over each group of tokens
            k = torch.cat([self._quantize_k(c) for c in k.split(group, dim=-2)], dim=-2)
        else:
            k = self._quantize_k(k)
        if self.cfg.v_granularity == "per_channel":
            v = torch.cat([_fake_quant(c, self.spec, "per_channel") for c in v.split(group, dim=-2)], dim=-2)
        else:
            v = _fake_quant(v, self.spec, "per_token")
        self.keys = k if self.keys is None or self.keys.numel() == 0 else torch.cat([self.keys, k], dim=-2)
        self.values = (
            v if self.values is None or self.values.numel() == 0 else torch.cat([self.values, v], dim=-2)
        )
        self.window_k, self.window_v = self.window_k[..., chunk:, :], self.window_v[..., chunk:, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states[..., :0, :]
            self.values = value_states[..., :0, :]
            self.window_k, self.window_v = key_states, value_states
        else:
            self.window_k = torch.cat([self.window_k, key_states], dim=-2)
            self.window_v = torch.cat([self.window_v, value_states], dim=-2)
        full_k = torch.cat([self.keys, self.window_k], dim=-2)
        full_v = torch.cat([self.values, self.window_v], dim=-2)
        self._flush(self.cfg.residual)  # what later steps read; this step reads its own tokens in float
        return full_k, full_v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + self.window_k.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.window_k is not None:
            self.window_k = self.window_k.index_select(0, beam_idx.to(self.window_k.device))
            self.window_v = self.window_v.index_select(0, beam_idx.to(self.window_v.device))


class QuantizedKVCache(Cache):
    """A cache of `QuantizedKVLayer`s, one per attention layer (full-attention models)."""

    def __init__(self, config: Any, cfg: KVCacheConfig) -> None:
        text = config.get_text_config(decoder=True)
        types_ = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        if set(types_) - {"full_attention"}:
            msg = f"recipe key 'kv_cache': layers of kind {sorted(set(types_) - {'full_attention'})} are not supported"
            raise ConfigError(msg)
        super().__init__(layers=[QuantizedKVLayer(cfg) for _ in types_])


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
