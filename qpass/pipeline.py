"""pipeline: block-wise, sequential execution of the quantize stage's calibration and weights.

One-shot calibration runs the whole float graph over every batch, so each layer's GPTQ Hessian
(and each static activation range) describes the *float* model's activations. But the quantized
model feeds every layer the outputs of layers that are already quantized, so its Hessian should
describe those inputs. GPTQ's own paper, llm-compressor and GPTQModel therefore calibrate layer
by layer: block i is calibrated on the outputs of blocks 0..i-1 with their weights quantized.
`calibration: {sequential: true}` does that on the torch path:

1. the graph is cut into blocks at its residual Adds (`qpass.graph.regions.blocks`: structure, no
   module names);
2. every batch's live values at the current cut (the residual stream, the position tables, the
   mask...) are kept; block i runs from them node by node (an `fx.Interpreter` over a node range),
   and the statistics of the values its quantizable ops read are accumulated as they are computed;
3. block i's ops are planned (GPTQ, ranges...) from those statistics by the usual planner;
4. block i runs again from the same inputs with its linears quantized as the plan says (weights
   as dequantized codes plus corrections, activations fake-quantized as the lowering quantizes
   them); its outputs become block i+1's inputs. Convs and float-kept ops propagate in float.

With `objective: float_outputs` a float copy of every batch's values at the cut runs alongside,
and each linear is fitted to the float model's outputs rather than to its own float weights on
the new inputs (`_float_output_targets`).

Only one block's intermediate values exist at a time, plus each batch's values at the cut. The
passes before the quantize stage are untouched: they run on the whole graph and keep their
verification. With `inputs: float` step 4 is skipped; the statistics are then the one-shot ones
and the plan is identical (what the tests check the block-wise execution against).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from qpass.calibration import Stats, StatsCollector, as_rows
from qpass.errors import ConfigError
from qpass.graph.edits import EditPlan, SiteNote
from qpass.graph.fx import FxGraphView
from qpass.graph.fx_capture import split_batch
from qpass.graph.refs import ConstRef, OpKind
from qpass.graph.regions.blocks import Block, find_blocks
from qpass.pipeline_dist import all_reduce_stats, all_reduce_sums, local_batches
from qpass.qconfig import ActivationQuantConfig, CalibrationConfig, WeightQuantConfig
from qpass.quant.qlinear import (
    QLinear,
    QuantPlan,
    canonical_weight,
    fake_quant_act,
    plan_quantization,
    quant_stat_requests,
)
from qpass.quant.selection import LayerSelection


@dataclass(frozen=True)
class _Quantized:
    """What a planned linear computes during propagation: its effective weight, stored layout."""

    weight: torch.Tensor
    qlinear: QLinear


class BlockRunner:
    """Runs a captured GraphModule one node range at a time, keeping each batch's live values.

    The inputs are flattened by the graph's own pytree spec (what its generated `forward` does),
    so batches are given as they would be to the module. A value is freed after its last reader
    has run, so a batch's environment between blocks holds just what crosses the cut.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        last = {n: max((self.index[u.name] for u in n.users), default=i) for i, n in enumerate(self.nodes)}
        self.frees: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last.items():
            self.frees[i].append(n)
        self._inputs = self._input_module(gm)

    @staticmethod
    def _input_module(gm: fx.GraphModule) -> fx.GraphModule:
        """A module mapping the model's arguments to its placeholders' values, by its own in_spec."""
        graph = fx.Graph()
        placeholders = [graph.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
        graph.output(placeholders)
        codegen = gm.graph._codegen
        if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
            info = codegen.pytree_info
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
        return fx.GraphModule(torch.nn.Module(), graph)

    def start(self, batch: Any) -> dict[fx.Node, Any]:
        """The environment before the first node: the placeholders' values."""
        args, kwargs = split_batch(batch)
        values = self._inputs(*args, **kwargs)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        return dict(zip(placeholders, values, strict=True))

    def span(self, blocks: Sequence[Block], k: int) -> range:
        """Node indices of block k: after the previous block's closing Add, through its own."""
        lo = 0 if k == 0 else self.index[blocks[k - 1].end] + 1
        hi = len(self.nodes) if blocks[k].end is None else self.index[blocks[k].end] + 1
        return range(lo, hi)

    def run(
        self,
        env: dict[fx.Node, Any],
        nodes: range,
        observe: dict[str, Any] | None = None,
        quantized: dict[str, _Quantized] | None = None,
        keep_output: bool = False,
    ) -> dict[fx.Node, Any]:
        """Run `nodes` from `env` (updated in place and returned); `observe[name](value)` sees
        each named value once it exists, `quantized` nodes compute their quantized form. The
        graph's outputs (an LM's full-vocabulary logits) are dropped unless `keep_output`.
        """
        observe = observe or {}
        for name in observe:  # values computed upstream of this block
            node = self.nodes[self.index[name]]
            if node in env:
                observe[name](env[node])
        self.interp.env = env
        with torch.no_grad():
            for i in nodes:
                node = self.nodes[i]
                if node.op == "output":
                    for dead in [] if keep_output else self.frees[i]:
                        env.pop(dead, None)
                    break
                if node.op == "placeholder":
                    pass
                elif quantized and node.name in quantized:
                    env[node] = self._quantized(node, quantized[node.name])
                else:
                    env[node] = self.interp.run_node(node)
                if node.name in observe and node in env:
                    observe[node.name](env[node])
                for dead in self.frees[i]:
                    env.pop(dead, None)
        return env

    def _quantized(self, node: fx.Node, q: _Quantized) -> Any:
        args, kwargs = self.interp.fetch_args_kwargs_from_env(node)
        x = args[0]
        if q.qlinear.act is not None:
            x = fake_quant_act(x, q.qlinear.act, q.qlinear.act_qparams)
        return node.target(x, q.weight.to(args[1].dtype), *args[2:], **kwargs)


def sequential_plan(
    view: FxGraphView,
    wcfg: WeightQuantConfig | None,
    acfg: ActivationQuantConfig | None,
    batches: Sequence[Any],
    selection: LayerSelection | None,
    config: CalibrationConfig,
    *,
    progress: bool = False,
) -> tuple[QuantPlan, EditPlan]:
    """The quantize plan, calibrated and planned block by block (module doc); plus a per-block report."""
    if wcfg is not None and wcfg.mixed is not None:
        msg = "calibration.sequential: weights.mixed chooses formats over the whole graph; use sequential: false"
        raise ConfigError(msg)
    if not isinstance(view, FxGraphView):
        msg = f"calibration.sequential runs on the torch path only, not on a {type(view).__name__}"
        raise ConfigError(msg)
    view.invalidate()
    blocks = find_blocks(view)
    requests = quant_stat_requests(view, acfg, wcfg)
    collector = StatsCollector(requests)
    where = _observing_block(view, blocks, [r.value.name for r in requests])
    runner = BlockRunner(view.gm)
    mine = local_batches(batches)  # this rank's share under torch.distributed (qpass.pipeline_dist)
    envs = [runner.start(b) for b in mine]
    propagate = config.inputs == "quantized"
    asymmetric = config.objective == "float_outputs" and wcfg is not None and wcfg.needs_hessian
    fenvs = [dict(e) for e in envs] if asymmetric else []  # the float model's values at the cut
    cross: dict[str, torch.Tensor] = {}  # X_fp^T X per linear input (objective float_outputs)
    stats, plan = Stats(), QuantPlan("quantize")
    report = EditPlan("sequential calibration")
    spill = contextlib.ExitStack()
    folder = None
    for k, block in enumerate(blocks):
        t0 = time.perf_counter()
        span = runner.span(blocks, k)
        names = [n for n, b in where.items() if b == k]
        for i, (batch, env) in enumerate(zip(mine, envs, strict=True)):
            floats: dict[str, torch.Tensor] | None = None
            if asymmetric:
                floats = {}
                runner.run(fenvs[i], span, {n: _stash(floats, n) for n in names})
            observe = {n: _feeder(collector, n, batch, f"batch {i}, ", floats, cross) for n in names}
            out = runner.run(dict(env) if propagate else env, span, observe)
            if not propagate:
                envs[i] = out
        stats.values.update(all_reduce_stats(collector.finish(names)).values)
        all_reduce_sums(cross, names)
        ops = {op.name for op in block.quantizable}
        targets = _float_output_targets(view, block, stats, cross, wcfg) if asymmetric else {}
        with _written(view, targets):
            part = plan_quantization(view, stats, wcfg, acfg, batches, selection, ops)
        plan.edits += part.edits
        plan.notes += part.notes
        if propagate and k < len(blocks) - 1:  # the tail's outputs feed nothing
            quantized = {e.op.name: _propagated(view, e.op, e.qlinear) for e in part.edits}
            quantized = {n: q for n, q in quantized.items() if q is not None}
            for env in envs:
                runner.run(env, span, quantized=quantized)
        for name in names:
            cross.pop(name, None)
        last = k == len(blocks) - 1
        offloaded = not last and config.offload_mb is not None and _cut_mib(envs + fenvs) > config.offload_mb
        if offloaded:
            folder = folder or Path(spill.enter_context(tempfile.TemporaryDirectory(prefix="qpass-cut-")))
            for i, env in enumerate(envs + fenvs):
                _offload(env, folder / f"env{i}.pt")
        detail = (
            f"{len(part.edits)} ops planned from {len(names)} calibrated values over {len(batches)} batches "
            f"({'quantized' if propagate else 'float'} inputs"
            + (f", {len(targets)} weights fitted to float outputs" if asymmetric else "")
            + (f", cut memory-mapped from {folder}" if offloaded else "")
            + f"), {time.perf_counter() - t0:.2f}s"
        )
        report.notes.append(SiteNote(block.describe(), True, detail))
        if progress:
            print(f"[qpass] {block.describe()}: {detail}", flush=True)
    from qpass.quant.conv import unquantized_notes

    plan.notes += unquantized_notes(view, {op.name for b in blocks for op in b.quantizable})
    envs.clear()
    fenvs.clear()
    spill.close()
    return plan, report


def _spillable(node: fx.Node, value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not isinstance(value, torch.nn.Parameter)
        and node.op != "get_attr"
    )


def _cut_mib(envs: Sequence[dict[fx.Node, Any]]) -> float:
    """MiB of activations held at the cut (constants excluded: they are the model's own)."""
    total = sum(v.numel() * v.element_size() for env in envs for n, v in env.items() if _spillable(n, v))
    return total / 2**20


def _offload(env: dict[fx.Node, Any], path: Path) -> None:
    """Write the env's activations to `path` and map them back (an earlier file of the same
    name stays readable by the tensors still mapping it until they are freed).
    """
    tensors = {n.name: v.contiguous() for n, v in env.items() if _spillable(n, v)}
    tmp = path.with_suffix(".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    for node in [n for n in env if n.name in loaded]:
        env[node] = loaded[node.name]


def _stash(store: dict[str, torch.Tensor], name: str) -> Any:
    return lambda value: store.__setitem__(name, value)


def _finite64(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.detach().to(torch.float64)
    return torch.where(torch.isfinite(rows), rows, 0.0)


def _feeder(
    collector: StatsCollector,
    name: str,
    batch: Any,
    where: str,
    floats: dict[str, torch.Tensor] | None = None,
    cross: dict[str, torch.Tensor] | None = None,
) -> Any:
    """Feeds `name`'s value to the collector, and with the float model's value of the same
    tokens at hand (`floats`) accumulates the cross moment X_fp^T X into `cross`.
    """

    def feed(value: torch.Tensor) -> None:
        collector.update(name, value, batch, where)
        if floats is not None and cross is not None and name in floats:
            xf = _finite64(as_rows(floats.pop(name), batch))
            c = xf.T @ _finite64(as_rows(value, batch))
            cross[name] = c if name not in cross else cross[name] + c

    return feed


def _float_output_targets(
    view: FxGraphView,
    block: Block,
    stats: Stats,
    cross: dict[str, torch.Tensor],
    wcfg: WeightQuantConfig,
) -> dict[str, torch.Tensor]:
    """Per weight constant of the block's linears, W' = W (C + λI)(H + λI)^-1 (stored layout),
    with H = X^T X on the quantized inputs and C = X_fp^T X: the ridge fit, pulled towards W, of
    the weight mapping the inputs the layer now gets to the float model's outputs.
    ||X Ŵ^T - X_fp W^T||² + λ||Ŵ - W||² equals ||Ŵ - W'||² in the metric H + λI plus a
    constant, which is what GPTQ of W' under its dampened H minimises. λ is GPTQ's dampening
    (`weights.damp` x mean diag H). Ridge towards W, not towards 0: with X = X_fp, W' = W
    exactly, and on a model with massive channels (a large mean diagonal, so a large λ) the
    plain ridge W C (H + λI)^-1 shrinks every ordinary channel's weights (measured on SmolLM2:
    perplexity 29 -> 87 for w4a16-gptq).
    """
    out: dict[str, torch.Tensor] = {}
    maps: dict[str, torch.Tensor] = {}
    for op in block.quantizable:
        name = view.linear_input(op).name
        ref = view.weight(op)
        if op.kind is not OpKind.LINEAR or name not in cross or ref is None or name not in stats:
            continue
        if name not in maps:
            h = stats[name].xtx
            lam = 0.0 if h is None else wcfg.damp * float(h.diagonal().mean())
            if h is None or lam <= 0:
                continue
            eye = lam * torch.eye(h.shape[0], dtype=h.dtype)
            maps[name] = torch.linalg.solve(h + eye, (cross[name] + eye).T).T  # (C + λI)(H + λI)^-1
        w = canonical_weight(view.read(ref.const), ref).to(torch.float64)
        target = (w @ maps[name]).to(torch.float32)
        out[ref.const.name] = target if ref.out_axis == 0 else target.T.contiguous()
    return out


@contextlib.contextmanager
def _written(view: FxGraphView, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The constants hold `weights` while the planner reads them; the originals are restored."""
    saved = {name: view.read(ConstRef(name, tuple(w.shape))) for name, w in weights.items()}
    try:
        for name, w in weights.items():
            view.write(ConstRef(name, tuple(w.shape)), w)
        yield
    finally:
        for name, w in saved.items():
            view.write(ConstRef(name, tuple(w.shape)), w)


def _observing_block(view: FxGraphView, blocks: Sequence[Block], names: Sequence[str]) -> dict[str, int]:
    """The block in which each requested value is observed: that of the first quantizable op that
    reads it (so its statistics see every upstream block quantized), else the block computing it.
    """
    block_of = {op.name: b.index for b in blocks for op in b.ops}
    readers: dict[str, int] = {}
    for b in blocks:
        for op in b.quantizable:
            readers.setdefault(view.linear_input(op).name, b.index)
    out = {}
    for name in names:
        if name in readers:
            out[name] = readers[name]
        else:
            out[name] = block_of.get(name, 0)  # a placeholder is there from the start
    return out


def _propagated(view: FxGraphView, op: Any, q: QLinear) -> _Quantized | None:
    """The stored-layout effective weight of a planned linear; None (float) for convs and float weights."""
    if op.kind is not OpKind.LINEAR or (q.codes is None and q.act is None):
        return None
    ref = q.weight
    w = q.effective_weight() if q.codes is not None else view.read(ref.const).to(torch.float32)
    if q.codes is not None and ref.out_axis != 0:
        w = w.T
    return _Quantized(w.contiguous(), q)
