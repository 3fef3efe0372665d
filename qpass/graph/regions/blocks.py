"""Blocks: the residual stream cut into the segments a layer-wise pipeline runs one at a time.

A transformer's repeated structure is visible in its graph without any module name: every
sublayer (attention, MLP) reads the residual stream through a norm and writes its result back
with a residual Add. Cutting the graph's ops, in topological order, right after each such Add
gives one block per sublayer: a norm, the linears behind it, and the Add. What comes before the
first block (the embedding, the position tables) is in block 0; what follows the last Add (the
final norm and the output head) is the tail block. The residual Adds come from the shared
residual-stream walker (`qpass.graph.regions.streams`), so the same rule holds for pre-norm,
post-norm, LayerNorm and RMSNorm stacks alike. A graph with no residual stream is one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpass.graph.refs import OpRef
from qpass.graph.regions.streams import residual_adds
from qpass.graph.view import GraphView, iter_quantizable_ops


@dataclass(frozen=True)
class Block:
    """One segment of the graph: its ops in graph order and the quantizable ops among them."""

    index: int
    ops: tuple[OpRef, ...]
    quantizable: tuple[OpRef, ...]
    end: str | None  # the residual Add closing the block; None for the tail

    def describe(self) -> str:
        where = f"up to '{self.end}'" if self.end else "tail"
        return f"block {self.index} ({where}): {len(self.ops)} ops, {len(self.quantizable)} quantizable"


def find_blocks(view: GraphView) -> list[Block]:
    """The graph's ops cut after every residual Add of its stream components (see module doc)."""
    adds = residual_adds(view)
    quantizable = {op.name for op in iter_quantizable_ops(view)}
    blocks: list[Block] = []
    current: list[OpRef] = []

    def close(end: str | None) -> None:
        qs = tuple(op for op in current if op.name in quantizable)
        blocks.append(Block(len(blocks), tuple(current), qs, end))
        current.clear()

    for op in view.ops():
        current.append(op)
        if op.name in adds:
            close(op.name)
    if current or not blocks:
        close(None)
    return blocks
