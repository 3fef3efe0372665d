"""Random small transformer / MLP / conv graphs for property tests, built from a plain spec.

A `GraphSpec` is drawn by hypothesis (`graph_specs()`); `build(spec)` turns it into an eval-mode
torch module with injected outlier channels, and `example_batches(spec)` gives calibration and
held-out inputs. The ONNX form is exported from the same module, so both backends see one function.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from models import RMSNorm
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass(frozen=True)
class BlockSpec:
    """One block: `kind` mlp | glu | attn | conv; `residual` none | pre | post (norm after the add)."""

    kind: str
    hidden: int
    norm: str  # none | layer | rms
    act: str
    residual: str
    bias: bool
    heads: int
    side_branch: bool  # the norm output also feeds an extra linear summed into the block's output


@dataclass(frozen=True)
class GraphSpec:
    """Widths, blocks and outliers of one random model; `conv` models take [B, C, H, W] inputs."""

    dim: int
    blocks: tuple[BlockSpec, ...]
    conv: bool
    outlier_channels: tuple[int, ...]
    outlier_factor: float
    head_bias: bool
    seed: int


WIDTHS = (8, 12, 16, 24, 32)


@st.composite
def block_specs(draw, dim: int, conv: bool) -> BlockSpec:
    kind = "conv" if conv else draw(st.sampled_from(("mlp", "glu", "attn")))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim % h == 0 and dim // h >= 2]))
    return BlockSpec(
        kind=kind,
        hidden=draw(st.sampled_from(WIDTHS)),
        norm="none" if conv else draw(st.sampled_from(("none", "layer", "rms"))),
        act=draw(st.sampled_from(tuple(ACTIVATIONS))),
        residual=draw(st.sampled_from(("none", "pre", "post"))),
        bias=draw(st.booleans()),
        heads=heads,
        side_branch=draw(st.booleans()),
    )


@st.composite
def graph_specs(draw) -> GraphSpec:
    conv = draw(st.integers(0, 5)) == 0  # about 1 in 6 models is a conv net
    dim = draw(st.sampled_from(WIDTHS))
    blocks = tuple(draw(block_specs(dim, conv)) for _ in range(draw(st.integers(1, 2))))
    n_out = draw(st.integers(0, 2))
    channels = tuple(sorted(set(draw(st.lists(st.integers(0, dim - 1), min_size=n_out, max_size=n_out)))))
    return GraphSpec(
        dim=dim,
        blocks=blocks,
        conv=conv,
        outlier_channels=channels,
        outlier_factor=draw(st.sampled_from((1.0, 10.0, 50.0))),
        head_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return RMSNorm(dim)
    return nn.Identity()


class Block(nn.Module):
    """A pre-/post-norm block whose inner function is an MLP, a GLU, attention or a conv pair."""

    def __init__(self, spec: BlockSpec, dim: int) -> None:
        super().__init__()
        self.spec = spec
        h, b = spec.hidden, spec.bias
        self.norm = _norm(spec.norm, dim)
        self.act = ACTIVATIONS[spec.act]
        if spec.kind == "conv":
            self.c1 = nn.Conv2d(dim, h, kernel_size=3, padding=1, bias=b)
            self.c2 = nn.Conv2d(h, dim, kernel_size=1, bias=b)
        elif spec.kind == "attn":
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=b) for _ in range(3))
            self.o = nn.Linear(dim, dim, bias=b)
        else:
            self.up = nn.Linear(dim, h, bias=b)
            self.gate = nn.Linear(dim, h, bias=b) if spec.kind == "glu" else None
            self.down = nn.Linear(h, dim, bias=b)
        self.side = nn.Linear(dim, dim, bias=b) if spec.side_branch and spec.kind != "conv" else None

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.kind == "conv":
            return self.c2(self.act(self.c1(x)))
        if s.kind == "attn":
            bsz, t, d = x.shape
            hd = d // s.heads

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.view(bsz, t, s.heads, hd).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1)
            return self.o((att @ v).transpose(1, 2).reshape(bsz, t, d))
        u = self.up(x)
        u = self.act(self.gate(x)) * u if self.gate is not None else self.act(u)
        return self.down(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.residual == "post":
            y = x + self.inner(x)
            if self.side is not None:
                y = y + self.side(x)
            return self.norm(y)
        h = self.norm(x)
        y = self.inner(h)
        if self.side is not None:
            y = y + self.side(h)
        return x + y if self.spec.residual == "pre" else y


class RandomNet(nn.Module):
    """The blocks in sequence, then a linear head (conv nets: channel-last before the head)."""

    def __init__(self, spec: GraphSpec) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(Block(b, spec.dim) for b in spec.blocks)
        self.head = nn.Linear(spec.dim, 6, bias=spec.head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.spec.conv:
            x = x.permute(0, 2, 3, 1)
        return self.head(x)


def build(spec: GraphSpec) -> RandomNet:
    """The spec's model in eval mode, with random norm affines and outlier channels blown up."""
    torch.manual_seed(spec.seed)
    model = RandomNet(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    ch = list(spec.outlier_channels)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, RMSNorm)):
                mod.weight.copy_(1.0 + 0.3 * torch.randn(mod.weight.shape, generator=gen))
                mod.weight[ch] *= spec.outlier_factor
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
            if isinstance(mod, Block) and mod.spec.kind in ("mlp", "glu"):
                rows = [c % mod.up.out_features for c in ch]
                mod.up.weight[rows] *= spec.outlier_factor
    return model.eval()


def example_batches(spec: GraphSpec, n: int = 3, batch: int = 2, seq: int = 4) -> list[torch.Tensor]:
    """`n` input batches; the input's outlier channels are scaled too (raw activations have them)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    shape = (batch, spec.dim, 3, 3) if spec.conv else (batch, seq, spec.dim)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=gen)
        axis = 1 if spec.conv else -1
        idx = torch.tensor(spec.outlier_channels, dtype=torch.long)
        x.index_fill_(axis, idx, 0.0)
        x = x + torch.zeros_like(x).index_fill_(axis, idx, 1.0) * spec.outlier_factor * torch.randn(
            shape, generator=gen
        )
        out.append(x)
    return out


def export_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The TorchScript exporter (fast enough for hundreds of tiny graphs), batch/sequence dynamic."""
    buf = io.BytesIO()
    dyn = {0: "batch"} if example.ndim == 4 else {0: "batch", 1: "seq"}
    torch.onnx.export(
        model,
        (example,),
        buf,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": dyn, "y": dyn},
        opset_version=17,
    )
    return onnx.load_from_string(buf.getvalue())
