"""Channel reordering for block formats ("Accurate Block Quantization in LLMs with Outliers").

A block format (MXFP4, NVFP4, BFP, INT groups) shares one scale per block of consecutive
channels of a reduction dimension; one outlier channel inflates the scale of its whole block.
Reordering the channels so outliers share blocks leaves the other blocks with small scales.
The permutation is folded into constants at compile time, so the graph gains no op:

- linear inputs: the consumers' input columns and the producer's output rows (and bias) are
  permuted with the same permutation. The producer may be a linear, reached through
  elementwise ops (GELU, SiLU, the SwiGLU product: every branch is permuted), per-channel
  constants, or attention (V -> o_proj: one permutation inside a head, repeated per head).
  A norm output is skipped: its channels are the residual stream's, which every block
  reads and writes.
- the K cache: the head dimension of W_q and W_k (and their biases) is permuted together,
  so Q K^T is unchanged and K is produced, and cached, in the reordered layout. A path with
  anything but head-layout ops (reshape, transpose, GQA repeat, a scalar scale) between the
  projections and Q K^T is skipped with a reason: RoPE's rotate_half pairs dims i and
  i + d/2, which a free permutation would break.

Head sites (K cache, V -> o_proj) get one permutation per head when every constant of the
site has as many heads as the activation (multi-head attention: head h of the producer is
head h of the consumer under the head split/merge reshapes): LLMs' outlier channels sit at
different positions in different heads, and one shared permutation could not cluster them
all. Under GQA (fewer K/V heads than Q heads) one permutation is shared by all heads, chosen
from the largest magnitude over heads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from qpass.calibration import ChannelStats, StatKind, StatRequest, Stats
from qpass.errors import ConfigError, PassError
from qpass.graph.edits import EditPlan, PermuteChannels, SiteNote
from qpass.graph.refs import ConstRef, OpKind, OpRef, ValueRef, WeightRef
from qpass.graph.regions import Absorber, Site, find_absorber, find_sites, is_channel_vector
from qpass.graph.view import GraphView
from qpass.pass_base import PassContext, QPass


class ReorderMethod(enum.Enum):
    """How the permutation is chosen from a per-channel magnitude."""

    SORT = "sort"  # channels by descending magnitude: blocks hold channels of similar size
    BALANCE = "balance"  # only outlier channels move, packed into the fewest blocks (fewest moves)


class ReorderKey(enum.Enum):
    """The per-channel magnitude that orders channels."""

    ACTIVATION = "activation"  # calibrated absmax of the activation (needs calibration)
    RMS = "rms"  # calibrated root-mean-square: the typical size, not one extreme token
    WEIGHT = "weight"  # absmax of the consumers' input columns (no calibration)


@dataclass(frozen=True)
class ReorderConfig:
    """block: the format's block size; what to reorder: linear inputs and/or the K cache."""

    block: int = 32
    method: ReorderMethod = ReorderMethod.SORT
    key: ReorderKey = ReorderKey.RMS
    linear_inputs: bool = True
    k_cache: bool = True
    outlier_ratio: float = 4.0  # a channel above this multiple of the median is an outlier (both methods)
    per_head: bool = True  # head sites: one permutation per head where the head counts agree

    def __post_init__(self) -> None:
        if self.block < 2:
            msg = f"recipe key 'reorder.block': must be an integer >= 2, got {self.block}"
            raise ConfigError(msg)
        if self.outlier_ratio <= 1.0:
            msg = f"recipe key 'reorder.outlier_ratio': must be > 1, got {self.outlier_ratio}"
            raise ConfigError(msg)
        if not (self.linear_inputs or self.k_cache):
            msg = "recipe key 'reorder': 'linear_inputs' and 'k_cache' are both false; nothing to reorder"
            raise ConfigError(msg)


# ----------------------------------------------------------------------------- permutations
def sort_permutation(key: torch.Tensor, block: int | None = None, ratio: float | None = None) -> torch.Tensor:
    """perm[i] = the channel stored at position i: channels by descending magnitude (stable).

    With `block` and `ratio`: the outliers (key > ratio x median) first, then, in the free slots
    of their last block, the smallest channels rather than the next largest: whatever shares a
    block with an outlier is quantized with the outlier's scale (small values round to zero, an
    error of their own size), so the channels that lose least should be the ones there.
    """
    k = key.to(torch.float64)
    order = torch.argsort(-k, stable=True)
    if block is None or ratio is None:
        return order
    n_out = int((k > ratio * k.median().clamp_min(1e-30)).sum())
    free = (-n_out) % block
    if n_out == 0 or free == 0 or n_out + free > k.numel():
        return order
    rest = order[n_out:]
    return torch.cat([order[:n_out], rest[rest.numel() - free :], rest[: rest.numel() - free]])


def balance_permutation(key: torch.Tensor, block: int, ratio: float) -> torch.Tensor:
    """Pack the outlier channels (key > ratio x median) into the fewest blocks, moving as few
    channels as possible: the blocks already holding most outliers receive the rest, and the
    normal channels they displace take the outliers' old positions.
    """
    n = key.numel()
    key = key.to(torch.float64)
    outliers = set(torch.nonzero(key > ratio * key.median().clamp_min(1e-30)).flatten().tolist())
    perm = list(range(n))
    if not outliers:
        return torch.tensor(perm)
    blocks = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    counts = [sum(c in outliers for c in b) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda b: (-counts[b], b))
    dest: list[int] = []
    for b in order:
        if len(dest) >= len(outliers):
            break
        dest += sorted(blocks[b], key=lambda c: c not in outliers)  # outliers keep their slot
    dest_set = set(dest[: len(outliers)])
    # outliers outside the destination slots swap with normal channels inside them
    movers = sorted((c for c in outliers if c not in dest_set), key=lambda c: -key[c])
    free = [p for p in dest[: len(outliers)] if p not in outliers]
    for src, dst in zip(movers, free, strict=True):
        perm[src], perm[dst] = perm[dst], perm[src]
    return torch.tensor(perm)


def tile_permutation(perm: torch.Tensor, width: int) -> torch.Tensor:
    """The same permutation inside each consecutive group of len(perm) channels (per head)."""
    period = perm.numel()
    return torch.cat([h * period + perm for h in range(width // period)])


def head_permutation(perms: list[torch.Tensor], width: int) -> torch.Tensor:
    """Head h of a `width`-wide axis takes perms[h]; one permutation is tiled over every head."""
    if len(perms) == 1:
        return tile_permutation(perms[0], width)
    period = perms[0].numel()
    if width != period * len(perms):
        msg = f"{len(perms)} head permutations of {period} do not cover {width} channels"
        raise PassError(msg)
    return torch.cat([h * period + p for h, p in enumerate(perms)])


def blocks_max_mse_proxy(key: torch.Tensor, perm: torch.Tensor, block: int) -> float:
    """Sum over blocks of (block max)^2 x block length: what a shared scale costs (for reports)."""
    k = key.to(torch.float64)[perm]
    return float(
        sum(k[s : s + block].max() ** 2 * k[s : s + block].numel() for s in range(0, k.numel(), block))
    )


def channel_key(kind: ReorderKey, stats: ChannelStats) -> torch.Tensor:
    """Per-channel magnitude from calibration statistics (key 'activation' or 'rms').

    RMS, not absmax, is what sets a channel's share of a block's error: the block scale follows
    each token's block max, and absmax ranks channels by one extreme token (heavy-tailed MLP
    activations: absmax/RMS 4-8), so absmax-sorted blocks mix channels of different typical size.
    """
    if kind is ReorderKey.RMS:
        if stats.sumsq is None:
            msg = "reorder key 'rms' needs calibration moments (StatKind.MOMENTS)"
            raise PassError(msg)
        return (stats.sumsq / max(stats.count, 1)).sqrt()
    return stats.absmax


# ----------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class PermutableSite:
    """A value whose channels can be stored permuted: the constants to permute on each side."""

    label: str
    value: ValueRef  # the activation whose statistics order the channels
    width: int  # channels of `value`
    period: int  # the permutation repeats with this period (width when it does not)
    sinks: tuple[tuple[ConstRef, int], ...]  # consumer side: (constant, axis)
    sources: tuple[tuple[ConstRef, int], ...]  # producer side: (constant, axis)
    weight_key: torch.Tensor | None = None  # per-channel magnitude from weights (key: weight)
    what: str = "linear input"


_ELEMENTWISE_BINARY = (OpKind.MUL, OpKind.ADD, OpKind.SUB, OpKind.DIV)


def _elementwise_sources(
    view: GraphView, value: ValueRef, channels: int
) -> tuple[list[tuple[ConstRef, int]], str] | str:
    """Producer-side constants of `value` through elementwise ops back to linears, or a reason.

    Every value inside the region must be read only by ops of the region (or by the site's
    consumers), since all of it is stored permuted.
    """
    targets: list[tuple[ConstRef, int]] = []
    seen_ops: set[str] = set()
    path: list[str] = []
    stack = [value]
    inner: list[ValueRef] = []
    while stack:
        current = stack.pop()
        op = view.producer(current)
        if op is None:
            return f"'{current.name}' is a graph input"
        if op.name in seen_ops:
            continue
        seen_ops.add(op.name)
        if current != value:
            inner.append(current)
        if op.kind in (OpKind.LAYER_NORM, OpKind.RMS_NORM):
            return (
                f"{op.op_type} '{op.name}' output: its channels are the residual stream's "
                "(every reader and writer would need the permutation)"
            )
        if op.kind is OpKind.LINEAR:
            weight = view.weight(op)
            if weight is None or weight.out_features != channels:
                return f"{op.op_type} '{op.name}' output width does not match {channels} channels"
            targets.append((weight.const, weight.out_axis))
            if weight.bias is not None:
                targets.append((weight.bias, 0))
            path.append(f"{op.op_type} '{op.name}'")
            continue
        if op.kind in (OpKind.ACTIVATION, OpKind.CAST):
            acts = view.value_operands(op)
            if len(acts) != 1:
                return f"{op.op_type} '{op.name}' has {len(acts)} activation operands"
            stack.append(acts[0])
            continue
        if op.kind in _ELEMENTWISE_BINARY:
            for operand in view.op_inputs(op):
                if isinstance(operand, ConstRef):
                    size = 1
                    for d in operand.shape:
                        size *= d
                    if size == 1:
                        continue
                    if not is_channel_vector(operand, channels):
                        return f"{op.op_type} '{op.name}' constant {operand.shape} is not per-channel"
                    targets.append((operand, len(operand.shape) - 1))
                elif isinstance(operand, ValueRef):
                    if _last_dim(view, operand) != channels:
                        return f"{op.op_type} '{op.name}' operand '{operand.name}' broadcasts over channels"
                    stack.append(operand)
            continue
        return f"producer {op.op_type} '{op.name}' is not elementwise or a linear"
    if not path:
        return "no linear producer"
    region = seen_ops
    for v in inner:
        if view.is_graph_output(v):
            return f"intermediate '{v.name}' is a graph output"
        outside = [c for c in view.consumers(v) if c.name not in region and c.kind is not OpKind.SHAPE_OF]
        if outside:
            return f"intermediate '{v.name}' also feeds {outside[0].op_type} '{outside[0].name}'"
    # ONNX MatMul + Add(bias): the bias is found both as the Add's constant and as weight.bias
    unique = list({c.name: (c, a) for c, a in targets}.values())
    return unique, " + ".join(path)


def _last_dim(view: GraphView, value: ValueRef) -> int | None:
    shape = view.shape(value)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _shared_constants(view: GraphView, targets) -> str | None:
    for const, _ in targets:
        users = view.const_users(const)
        if users != 1:
            return f"constant '{const.name}' is shared by {users} ops"
    return None


def linear_input_site(view: GraphView, site: Site) -> PermutableSite | str:
    """Where a linear-input site's permutation folds, or why it cannot."""
    sinks = tuple((s.weight.const, s.weight.in_axis) for s in site.sinks)
    w_key = _weight_key(view, site.sinks)
    absorber = find_absorber(view, site.value, site.channels)
    if isinstance(absorber, Absorber) and absorber.rotatable:  # only linear maps: any permutation folds
        period = absorber.period or site.channels
        return PermutableSite(
            site.label, site.value, site.channels, period, sinks, absorber.targets, w_key, "linear input"
        )
    found = _elementwise_sources(view, site.value, site.channels)
    if isinstance(found, str):
        return found
    targets, _ = found
    shared = _shared_constants(view, targets)
    if shared:
        return shared
    return PermutableSite(site.label, site.value, site.channels, site.channels, sinks, tuple(targets), w_key)


def _weight_key(view: GraphView, sinks) -> torch.Tensor:
    from qpass.quant.qlinear import canonical_weight

    cols = [canonical_weight(view.read(s.weight.const), s.weight).abs().amax(0) for s in sinks]
    return torch.stack(cols).amax(0)


_LAYOUT = (OpKind.RESHAPE, OpKind.TRANSPOSE, OpKind.EXPAND, OpKind.CAST)


def _trace_to_projection(
    view: GraphView, value: ValueRef
) -> tuple[OpRef, WeightRef, list[ConstRef], ValueRef] | str:
    """From a Q K^T operand up through head-layout ops to its projection linear.

    Returns (linear, weight, bias constants, the projection's output after biases), or why not.
    """
    current, biases, top = value, [], None
    while True:
        op = view.producer(current)
        if op is None:
            return f"'{current.name}' is a graph input"
        if view.is_graph_output(current) or len(view.consumers(current)) != 1:
            return f"'{current.name}' feeds other ops too (a K/V cache output?)"
        acts = view.value_operands(op)
        if op.kind in _LAYOUT and acts:
            current = acts[0]
            continue
        if op.kind in _ELEMENTWISE_BINARY:
            pair = view.constant_operand(op)
            if pair is not None:
                const, act = pair
                size = 1
                for d in const.shape:
                    size *= d
                if size == 1 and op.kind in (OpKind.MUL, OpKind.DIV):  # softmax scale
                    current = act
                    continue
                if op.kind is OpKind.ADD and len(const.shape) == 1:  # projection bias
                    biases.append(const)
                    top = top or current
                    current = act
                    continue
            return (
                f"{op.op_type} '{op.name}' lies between the projection and Q K^T "
                "(RoPE? its rotate_half pairs dims i and i + d/2; a free permutation would break it)"
            )
        if op.kind is OpKind.LINEAR:
            weight = view.weight(op)
            if weight is None:
                return f"{op.op_type} '{op.name}' has no constant weight"
            if weight.bias is not None:
                biases.append(weight.bias)
            return op, weight, list({b.name: b for b in biases}.values()), top or current
        return (
            f"{op.op_type} '{op.name}' lies between the projection and Q K^T "
            "(RoPE? its rotate_half pairs dims i and i + d/2; a free permutation would break it)"
        )


def _is_softmax_branch(view: GraphView, value: ValueRef) -> bool:
    current = value
    for _ in range(8):
        op = view.producer(current)
        if op is None:
            return False
        if op.kind is OpKind.SOFTMAX:
            return True
        acts = view.value_operands(op)
        if not acts or op.kind not in (*_LAYOUT, OpKind.CAST):
            return False
        current = acts[0]
    return False


def k_cache_sites(view: GraphView) -> tuple[list[PermutableSite], list[tuple[str, str]]]:
    """Q K^T products whose Q and K come straight from projections; the K side is the cache."""
    sites, rejected = [], []
    for op in view.ops_of(OpKind.MATMUL):
        acts = view.value_operands(op)
        if len(acts) != 2 or _is_softmax_branch(view, acts[0]):
            continue  # probs @ V, not Q K^T
        label = f"Q K^T '{op.name}'"
        shape = view.shape(acts[0])
        head = shape[-1] if shape and isinstance(shape[-1], int) else None
        if head is None:
            rejected.append((label, f"'{acts[0].name}' has no static head dimension"))
            continue
        q, k = (_trace_to_projection(view, a) for a in acts)
        if isinstance(q, str) or isinstance(k, str):
            rejected.append((label, q if isinstance(q, str) else k))
            continue
        (q_op, q_w, q_b, _), (k_op, k_w, k_b, k_value) = q, k
        if q_w.out_features % head or k_w.out_features % head:
            rejected.append((label, f"projection widths are not multiples of the head size {head}"))
            continue
        sinks = ((q_w.const, q_w.out_axis), *((b, 0) for b in q_b))
        sources = ((k_w.const, k_w.out_axis), *((b, 0) for b in k_b))
        shared = _shared_constants(view, (*sinks, *sources))
        if shared:
            rejected.append((label, shared))
            continue
        w_key = view.read(k_w.const).abs().amax(k_w.in_axis)
        sites.append(
            PermutableSite(
                f"{label}: {q_op.name}, {k_op.name}",
                k_value,
                k_w.out_features,
                head,
                sinks,
                sources,
                w_key,
                "K cache",
            )
        )
    return sites, rejected


# ----------------------------------------------------------------------------- the pass
class Reorder(QPass):
    """Permute reduction channels so outliers share blocks; folded into constants (no new op)."""

    name = "reorder"

    def _sites(self, view: GraphView) -> tuple[list[PermutableSite], list[SiteNote]]:
        usable: list[PermutableSite] = []
        notes: list[SiteNote] = []
        block = self.config.block
        candidates: list[PermutableSite | tuple[str, str]] = []
        if self.config.linear_inputs:
            sites, rejected = find_sites(view)
            candidates += rejected
            for site in sites:
                found = linear_input_site(view, site)
                candidates.append((site.label, found) if isinstance(found, str) else found)
        if self.config.k_cache:
            ksites, krejected = k_cache_sites(view)
            candidates += krejected + ksites
        for c in candidates:
            if isinstance(c, tuple):
                notes.append(SiteNote(c[0], False, c[1]))
            elif c.period <= block:
                why = (
                    f"{c.width} channels fit in one block of {block}"
                    if c.period == c.width
                    else f"heads of size {c.period} fit in one block of {block}: "
                    "reordering inside a head cannot change the blocks"
                )
                notes.append(SiteNote(c.label, False, why))
            else:
                usable.append(c)
        return usable, notes

    def stat_requests(self, view: GraphView, ctx: PassContext) -> list[StatRequest]:
        if self.config.key is ReorderKey.WEIGHT:
            return []
        kinds = {StatKind.RANGE} | ({StatKind.MOMENTS} if self.config.key is ReorderKey.RMS else set())
        return [StatRequest(s.value, frozenset(kinds)) for s in self._sites(view)[0]]

    def _keys(self, site: PermutableSite, stats: Stats) -> torch.Tensor:
        """[heads, period] magnitudes: one row per permutation to choose (one row if shared)."""
        if self.config.key is ReorderKey.WEIGHT:
            key = site.weight_key
        else:
            key = channel_key(self.config.key, stats[site.value])
        key = key.to(torch.float64).reshape(-1, site.period)
        tiles = {const.shape[axis] // site.period for const, axis in (*site.sinks, *site.sources)}
        if self.config.per_head and tiles == {key.shape[0]}:
            return key
        return key.amax(0, keepdim=True)

    def plan(self, view: GraphView, stats: Stats, ctx: PassContext) -> EditPlan:
        usable, notes = self._sites(view)
        plan = EditPlan(self.name, notes=notes)
        cfg = self.config
        for site in usable:
            keys = self._keys(site, stats)
            if cfg.method is ReorderMethod.SORT:
                perms = [sort_permutation(k, cfg.block, cfg.outlier_ratio) for k in keys]
            else:
                perms = [balance_permutation(k, cfg.block, cfg.outlier_ratio) for k in keys]
            ident = torch.arange(site.period)
            if all(torch.equal(p, ident) for p in perms):
                plan.notes.append(SiteNote(site.label, False, "channels already in the chosen order"))
                continue
            before = sum(blocks_max_mse_proxy(k, ident, cfg.block) for k in keys)
            after = sum(blocks_max_mse_proxy(k, p, cfg.block) for k, p in zip(keys, perms, strict=True))
            for const, axis in (*site.sinks, *site.sources):
                full = head_permutation(perms, const.shape[axis])
                plan.edits.append(PermuteChannels(const, axis, full, site=site.label))
            moved = sum(int((p != ident).sum()) for p in perms)
            head = ""
            if site.period != site.width:
                head = f", per head of size {site.period}" + (
                    f" ({len(perms)} permutations)" if len(perms) > 1 else " (one shared permutation)"
                )
            plan.notes.append(
                SiteNote(
                    site.label,
                    True,
                    f"{site.what}: {cfg.method.value} moved {moved}/{site.period * len(perms)} channels{head}; "
                    f"block-scale cost {before / max(after, 1e-30):.2f}x lower",
                )
            )
        return plan
