"""Importable `module:factory` models for the CLI tests (`qpass quantize cli_models:tiny_bert`)."""

from __future__ import annotations

import torch
from models import MaskedAttention, TinyBert, inject_outliers


def tiny_bert() -> torch.nn.Module:
    """The BERT-like test model with injected outlier channels; the same weights on every call."""
    torch.manual_seed(0)
    return inject_outliers(TinyBert()).eval()


class TinyLM(torch.nn.Module):
    """A causal-LM-shaped model: token ids in, next-token logits [batch, seq, vocab] out."""

    vocab = 97

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(self.vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 2 * dim)
        self.down = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, self.vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return self.head(h)


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLM().eval()


def masked_attention() -> torch.nn.Module:
    """Attention with a float -inf mask, a per-channel gamma, a scalar temperature and a memory input."""
    return MaskedAttention().eval()
