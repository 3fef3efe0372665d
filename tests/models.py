"""Small graphs with injected outlier channels, in torch; ONNX forms are exported from them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """As in LLaMA (and transformers): weight * x * rsqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = (
                k[:, :, None]
                .expand(b, self.kv_heads, rep, t, self.head_dim)
                .reshape(b, self.heads, t, self.head_dim)
            )
            v = (
                v[:, :, None]
                .expand(b, self.kv_heads, rep, t, self.head_dim)
                .reshape(b, self.heads, t, self.head_dim)
            )
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e4
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    """Pre-norm decoder blocks (RMSNorm, GQA attention, SwiGLU) over float inputs [B, T, dim]."""

    def __init__(
        self, dim: int = 64, hidden: int = 160, heads: int = 4, kv_heads: int = 2, layers: int = 2
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock(dim, hidden, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, 48, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class BertBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, bias=True)
        self.ln1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyBert(nn.Module):
    """Post-LN encoder (LayerNorm, GELU) plus an OPT-style pre-LN block, over inputs [B, T, dim] and a mask."""

    def __init__(self, dim: int = 64, hidden: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertBlock(dim, hidden, heads) for _ in range(layers))
        self.pre_ln = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x + self.fc_out(F.relu(self.fc_in(self.pre_ln(x))))


def inject_outliers(
    model: nn.Module, channels: tuple[int, ...] = (3, 17), factor: float = 40.0, seed: int = 0
) -> nn.Module:
    """Randomise norm parameters and blow up a few channels of every norm output and every up/fc1
    projection output, as real LLMs show (massive activations on fixed channels).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (RMSNorm, nn.LayerNorm)) and mod.weight is not None:
                mod.weight.copy_(1.0 + 0.2 * torch.randn(mod.weight.shape, generator=gen))
                mod.weight[list(channels)] *= factor
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
            if isinstance(mod, LlamaBlock):
                mod.up_proj.weight[list(channels)] *= factor
    return model.eval()


def llama_inputs(n: int = 4, t: int = 16, dim: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, dim, generator=torch.Generator().manual_seed(seed))


def bert_inputs(n: int = 4, t: int = 16, dim: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t)
    mask[0, t // 2 :] = 0  # a padded row: calibration must ignore it
    return {"x": torch.randn(n, t, dim, generator=gen), "mask": mask}


def spread_channel_outliers(model: nn.Module, factor: float = 20.0, count: int = 4) -> nn.Module:
    """Outlier channels spread over many blocks of the activations a block format quantizes:
    `count` positions per head of V and K (Q divided by the same factor, so Q K^T keeps its
    values, as in LLMs with massive K channels) and of the MLP's inner activation.
    """

    def spread(width: int) -> list[int]:
        return [(2 * i + 1) * width // (2 * count) for i in range(count)]

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Attention):
                rows = [h * mod.head_dim + p for h in range(mod.kv_heads) for p in spread(mod.head_dim)]
                qrows = [h * mod.head_dim + p for h in range(mod.heads) for p in spread(mod.head_dim)]
                scaled = (
                    (mod.v_proj, rows, factor),
                    (mod.k_proj, rows, factor),
                    (mod.q_proj, qrows, 1 / factor),
                )
                for lin, rs, f in scaled:
                    lin.weight[rs] *= f
                    if lin.bias is not None:
                        lin.bias[rs] *= f
            inner = getattr(mod, "up_proj", None) or getattr(mod, "fc1", None) or getattr(mod, "fc_in", None)
            if isinstance(inner, nn.Linear) and not isinstance(mod, Attention):
                rs = spread(inner.out_features)
                inner.weight[rs] *= factor
                if inner.bias is not None:
                    inner.bias[rs] *= factor
    return model.eval()


def massive_channel_outliers(
    model: nn.Module, count: int = 4, factor: float = 100.0, k_count: int = 4, seed: int = 0
) -> nn.Module:
    """LLM-like outlier channels: a few fixed channels (the same for every token) carry values
    `factor` times the others, at random positions.

    - the MLP's inner activation (down_proj / fc2 input, as LLMs' massive activations): `count`
      channels, up_proj / fc1 rows times `factor`, the down projection's columns divided by it;
    - the K cache: `k_count` channels of every K head, at different positions in different
      heads, k_proj rows times `factor` and the matching q_proj rows divided (Q K^T unchanged).
    """
    gen = torch.Generator().manual_seed(seed)

    def pick(width: int, n: int) -> list[int]:
        return sorted(torch.randperm(width, generator=gen)[:n].tolist())

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Attention) and k_count:
                rep = mod.heads // mod.kv_heads
                for h in range(mod.kv_heads):
                    pos = pick(mod.head_dim, k_count)
                    krows = [h * mod.head_dim + p for p in pos]
                    qrows = [(h * rep + r) * mod.head_dim + p for r in range(rep) for p in pos]
                    for lin, rows, f in ((mod.k_proj, krows, factor), (mod.q_proj, qrows, 1 / factor)):
                        lin.weight[rows] *= f
                        if lin.bias is not None:
                            lin.bias[rows] *= f
            pairs = (("up_proj", "down_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"))
            for inner_name, outer_name in pairs:
                inner, outer = getattr(mod, inner_name, None), getattr(mod, outer_name, None)
                if isinstance(inner, nn.Linear) and isinstance(outer, nn.Linear) and count:
                    rows = pick(inner.out_features, count)
                    inner.weight[rows] *= factor
                    if inner.bias is not None:
                        inner.bias[rows] *= factor
                    outer.weight[:, rows] /= factor
    return model.eval()


class OptBlock(nn.Module):
    """Pre-LN block as in OPT: x + attn(LN(x)), x + fc2(relu(fc1(LN(x))))."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, bias=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class TinyOpt(nn.Module):
    """OPT-like decoder over token ids: embedding table, pre-LN blocks, final LayerNorm, untied head."""

    def __init__(
        self, vocab: int = 96, dim: int = 64, hidden: int = 128, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(OptBlock(dim, hidden, heads) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_ln(x))


def opt_inputs(n: int = 4, t: int = 16, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def inject_stream_outliers(
    model: nn.Module, channels: tuple[int, ...] = (3, 17), factor: float = 30.0, writers: bool = False
) -> nn.Module:
    """Massive residual-stream channels, as LLMs have: the embedding table (TinyOpt; for TinyLlama
    feed `stream_outlier_inputs`) emits them `factor` times larger, the residual carries them, and
    every linear reading a norm of the stream has small weights there (1/factor), so the outliers
    do not dominate the outputs. Norm fusion cannot remove them. `writers`: every linear writing the
    stream also emits them `factor` times larger (super weights: massive output rows).
    """
    idx = list(channels)
    writers_list, readers = [], []
    for mod in model.modules():
        if isinstance(mod, Attention):
            writers_list.append(mod.o_proj)
            readers += [mod.q_proj, mod.k_proj, mod.v_proj]
        elif isinstance(mod, LlamaBlock):
            writers_list.append(mod.down_proj)
            readers += [mod.gate_proj, mod.up_proj]
        elif isinstance(mod, OptBlock):
            writers_list.append(mod.fc2)
            readers.append(mod.fc1)
    head = getattr(model, "head", None)
    readers += [head] if head is not None else []
    writers = writers_list if writers else []
    with torch.no_grad():
        for lin in writers:
            lin.weight[idx] *= factor
            if lin.bias is not None:
                lin.bias[idx] *= factor
        for lin in readers:
            lin.weight[:, idx] /= factor
        if isinstance(model, TinyOpt):
            model.embed.weight[:, idx] *= factor
    return model.eval()


def stream_outlier_inputs(
    n: int = 4,
    t: int = 16,
    dim: int = 64,
    seed: int = 1,
    channels: tuple[int, ...] = (3, 17),
    factor: float = 30.0,
) -> torch.Tensor:
    """TinyLlama inputs whose residual stream starts with massive channels (as after an embedding)."""
    x = llama_inputs(n, t, dim, seed)
    x[..., list(channels)] *= factor
    return x


MEM = 5  # leading size of MaskedAttention's `memory` input


class MaskedAttention(nn.Module):
    """Scores + additive mask -> softmax; per-channel gamma, scalar temperature, a [MEM, 16] memory."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.mem = nn.Linear(16, 16)

    def forward(self, x, attn_mask, gamma, temperature, memory):
        h = x * gamma
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / temperature + attn_mask
        return self.o(scores.softmax(-1) @ self.v(h)) + self.mem(memory).mean(0)
