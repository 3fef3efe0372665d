"""Bit allocation across layers under a storage budget (multiple-choice knapsack).

Each layer offers candidate formats, each with a storage cost in bits and a measured
error (its sensitivity: e.g. ``layer_error`` or the model's output error when only that
layer is quantized with that format). Errors are assumed additive across layers, the
usual first-order assumption of sensitivity-based mixed precision (HAWQ, ZeroQ). We pick
one candidate per layer minimising the summed error with the summed cost within the
budget (never over it).

* ``method="dp"``: dynamic programming over a discretised cost axis. Costs are divided
  by their greatest common divisor when they are integers (storage in bits always is)
  and the budget then spans at most ``max_cells`` units: the DP is then exact
  (``is_optimal=True``). Otherwise costs are rounded UP to a grid of ``max_cells`` cells
  over the budget, so the answer still fits the true budget but may be slightly
  suboptimal; the leftover slack is then filled greedily and the plain greedy answer
  is kept if better. ``is_optimal`` is then True only if a brute-force check (small
  problems) confirms it.
* ``method="greedy"``: start from each layer's cheapest candidate and repeatedly take the
  upgrade with the largest error decrease per extra bit that still fits. Fast and
  usually close; never better than the DP. ``is_optimal`` as above (brute-force check
  on small problems).

``storage_bits(spec, shape)`` gives the cost of a ``QuantSpec`` on a weight: elements
plus scales (and zero points). Choosing formats for a graph's linears with this solver, from
measured sensitivities, is `qpass.quant.mixed_formats.choose_formats`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from qpass.errors import ConfigError
from qpass.formats import Granularity, QuantSpec, ScaleType

__all__ = [
    "Allocation",
    "Candidate",
    "LayerChoice",
    "allocate_bits",
    "brute_force",
    "storage_bits",
]

BRUTE_FORCE_LIMIT = 20_000  # combinations checked to certify a non-exact answer as optimal


@dataclass(frozen=True)
class Candidate:
    """One option for one layer: a label (format name), its storage cost and its error."""

    label: str
    bits: float
    error: float

    def __post_init__(self) -> None:
        for field in ("bits", "error"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                msg = f"Candidate {self.label!r}: '{field}' must be a finite number >= 0, got {v!r}"
                raise ConfigError(msg)


@dataclass(frozen=True)
class LayerChoice:
    """A layer, its candidates and its weight count (for ``budget_bits_avg``)."""

    name: str
    candidates: tuple[Candidate, ...]
    n_weights: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            msg = f"layer {self.name!r}: 'candidates' is empty"
            raise ConfigError(msg)
        for c in self.candidates:
            if not isinstance(c, Candidate):
                msg = f"layer {self.name!r}: candidates must be Candidate objects, got {type(c).__name__}"
                raise ConfigError(msg)
        n = self.n_weights
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            msg = f"layer {self.name!r}: 'n_weights' must be a positive int or None, got {n!r}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate of each layer, with totals.

    ``choices[i]`` indexes ``layers[i].candidates``; ``labels`` are their labels.
    ``is_optimal`` is True when the answer is proven to minimise the summed error
    within the budget (exact DP, or a brute-force check on a small problem).
    """

    layer_names: tuple[str, ...]
    choices: tuple[int, ...]
    labels: tuple[str, ...]
    total_bits: float
    total_error: float
    budget_bits: float
    is_optimal: bool
    method: str

    def avg_bits(self, n_weights: int) -> float:
        """Average bits per weight over ``n_weights`` weights."""
        return self.total_bits / n_weights

    def report(self) -> list[dict[str, object]]:
        """One row per layer: name, chosen label and index."""
        return [
            {"layer": n, "choice": lab, "index": i}
            for n, lab, i in zip(self.layer_names, self.labels, self.choices, strict=True)
        ]


def storage_bits(spec: QuantSpec, shape: Sequence[int], *, scale_bits: int = 16) -> int:
    """Bits to store a ``[out, in]`` weight in ``spec``: elements + scales (+ zero points).

    ``scale_bits`` is the width of a float32-type scale as stored by the target
    (MatMulNBits stores scales in the activation dtype: 16 for fp16, 32 for fp32);
    E8M0 and E4M3 scales are 8 bits (NVFP4 adds one 32-bit tensor scale). Asymmetric
    integers add one zero point of the element's width per scale.
    """
    if len(shape) != 2:
        msg = f"storage_bits: 'shape' must be [out, in], got {list(shape)}"
        raise ConfigError(msg)
    n_out, n_in = (int(s) for s in shape)
    g = spec.granularity
    if g is Granularity.PER_GROUP:
        n_scales = n_out * math.ceil(n_in / int(spec.group_size))
    elif g is Granularity.PER_CHANNEL:
        n_scales = n_out if spec.resolved_axis(2) == 0 else n_in
    elif g is Granularity.PER_TENSOR:
        n_scales = 1
    else:
        msg = "storage_bits: per_token granularity has no stored weight scales"
        raise ConfigError(msg)
    sb = scale_bits if spec.scale_type is ScaleType.FLOAT32 else 8
    total = n_out * n_in * spec.bits + n_scales * sb
    if spec.scale_type is ScaleType.E4M3:
        total += 32
    if not spec.symmetric:
        total += n_scales * spec.bits
    return total


# ------------------------------------------------------------------------------ helpers


def _budget(
    layers: Sequence[LayerChoice], budget_bits_avg: float | None, budget_bytes: float | None
) -> float:
    if (budget_bits_avg is None) == (budget_bytes is None):
        msg = "allocate_bits: give exactly one of arguments 'budget_bits_avg' or 'budget_bytes'"
        raise ConfigError(msg)
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes < 0:
            msg = f"argument 'budget_bytes' must be a number >= 0, got {budget_bytes!r}"
            raise ConfigError(msg)
        return float(budget_bytes) * 8.0
    if (
        isinstance(budget_bits_avg, bool)
        or not isinstance(budget_bits_avg, (int, float))
        or budget_bits_avg < 0
    ):
        msg = f"argument 'budget_bits_avg' must be a number >= 0, got {budget_bits_avg!r}"
        raise ConfigError(msg)
    missing = [layer.name for layer in layers if layer.n_weights is None]
    if missing:
        msg = f"argument 'budget_bits_avg' needs n_weights on every layer; missing on {missing[:5]}"
        raise ConfigError(msg)
    return float(budget_bits_avg) * sum(int(layer.n_weights) for layer in layers)


def _finish(
    layers: Sequence[LayerChoice], choices: Sequence[int], budget: float, optimal: bool, method: str
) -> Allocation:
    cands = [layer.candidates[c] for layer, c in zip(layers, choices, strict=True)]
    return Allocation(
        layer_names=tuple(layer.name for layer in layers),
        choices=tuple(int(c) for c in choices),
        labels=tuple(c.label for c in cands),
        total_bits=float(sum(c.bits for c in cands)),
        total_error=float(sum(c.error for c in cands)),
        budget_bits=budget,
        is_optimal=optimal,
        method=method,
    )


def _n_combinations(layers: Sequence[LayerChoice]) -> int:
    return math.prod(len(layer.candidates) for layer in layers)


def brute_force(layers: Sequence[LayerChoice], budget_bits: float) -> tuple[tuple[int, ...], float] | None:
    """The exact optimum by enumeration: ``(choices, total_error)``, or None if infeasible.

    Ties in error go to the cheaper combination. Exponential: for tests and for
    certifying small problems.
    """
    best: tuple[float, float, tuple[int, ...]] | None = None
    for combo in itertools.product(*(range(len(layer.candidates)) for layer in layers)):
        cs = [layer.candidates[c] for layer, c in zip(layers, combo, strict=True)]
        cost = sum(c.bits for c in cs)
        if cost > budget_bits:
            continue
        key = (sum(c.error for c in cs), cost, combo)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else (best[2], best[0])


def _certify(layers: Sequence[LayerChoice], budget: float, error: float) -> bool:
    if _n_combinations(layers) > BRUTE_FORCE_LIMIT:
        return False
    found = brute_force(layers, budget)
    return found is not None and error <= found[1] * (1 + 1e-12) + 1e-300


def _integer_unit(layers: Sequence[LayerChoice]) -> int | None:
    """The gcd of all costs when every cost is an integer (then the DP is exact), else None."""
    ints = []
    for layer in layers:
        for c in layer.candidates:
            if float(c.bits) != int(c.bits):
                return None
            ints.append(int(c.bits))
    g = reduce(math.gcd, ints, 0)
    return g or 1


# ------------------------------------------------------------------------------ solvers


def _dp(layers: Sequence[LayerChoice], budget: float, max_cells: int) -> tuple[list[int], bool]:
    """Multiple-choice knapsack DP; returns (choices, exact) or raises if infeasible."""
    unit = _integer_unit(layers)
    exact = unit is not None and math.floor(budget / unit) <= max_cells
    if exact:
        cap = math.floor(budget / unit)
        costs = [[int(c.bits) // unit for c in layer.candidates] for layer in layers]
    else:  # round costs up to a grid of max_cells cells over the budget: never over budget
        cell = budget / max_cells if budget > 0 else 1.0
        cap = max_cells if budget > 0 else 0
        costs = [[math.ceil(c.bits / cell - 1e-9) for c in layer.candidates] for layer in layers]
    # f[c] = least total error of the layers so far with discretised cost <= c
    f = np.zeros(cap + 1, dtype=np.float64)
    pick_dtype = np.int8 if max(len(layer.candidates) for layer in layers) <= 127 else np.int16
    picks = np.empty((len(layers), cap + 1), dtype=pick_dtype)
    for li, layer in enumerate(layers):
        g = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=pick_dtype)
        for k, cand in enumerate(layer.candidates):
            w = costs[li][k]
            if w > cap:
                continue
            val = np.full(cap + 1, np.inf)
            val[w:] = f[: cap + 1 - w] + cand.error
            better = val < g
            g[better] = val[better]
            pick[better] = k
        f, picks[li] = g, pick
    if not np.isfinite(f[cap]):
        _infeasible(layers, budget)
    choices = [0] * len(layers)
    c = cap
    for li in range(len(layers) - 1, -1, -1):
        k = int(picks[li, c])
        choices[li] = k
        c -= costs[li][k]
    return choices, exact


def _cheapest(layers: Sequence[LayerChoice], budget: float) -> list[int]:
    choices = [
        min(
            range(len(layer.candidates)),
            key=lambda k, ly=layer: (ly.candidates[k].bits, ly.candidates[k].error),
        )
        for layer in layers
    ]
    if sum(layer.candidates[k].bits for layer, k in zip(layers, choices, strict=True)) > budget:
        _infeasible(layers, budget)
    return choices


def _greedy(layers: Sequence[LayerChoice], budget: float, start: list[int]) -> list[int]:
    """From ``start``, take the fitting upgrade with the best error decrease per extra bit, repeatedly."""
    choices = list(start)
    spent = sum(layer.candidates[k].bits for layer, k in zip(layers, choices, strict=True))
    while True:
        best = None  # ((ratio, d_err), layer, candidate, d_bits)
        for li, layer in enumerate(layers):
            cur = layer.candidates[choices[li]]
            for k, cand in enumerate(layer.candidates):
                d_err = cur.error - cand.error
                d_bits = cand.bits - cur.bits
                if d_err <= 0 or spent + d_bits > budget:
                    continue
                key = (math.inf if d_bits <= 0 else d_err / d_bits, d_err)
                if best is None or key > best[0]:
                    best = (key, li, k, d_bits)
        if best is None:
            return choices
        _, li, k, d_bits = best
        choices[li] = k
        spent += d_bits


def _infeasible(layers: Sequence[LayerChoice], budget: float) -> None:
    least = sum(min(c.bits for c in layer.candidates) for layer in layers)
    msg = (
        f"allocate_bits: the budget of {budget:.6g} bits is below the cheapest allocation "
        f"({least:.6g} bits); raise 'budget_bits_avg'/'budget_bytes' or add cheaper candidates"
    )
    raise ConfigError(msg)


def allocate_bits(
    layers: Sequence[LayerChoice],
    *,
    budget_bits_avg: float | None = None,
    budget_bytes: float | None = None,
    method: str = "dp",
    max_cells: int = 100_000,
) -> Allocation:
    """Choose one candidate per layer minimising the summed error within the budget.

    Give exactly one budget: ``budget_bits_avg`` (bits per weight, averaged over all
    layers' ``n_weights``; candidate ``bits`` then include scales, so 4-bit g128 with fp16
    scales costs 4.125) or ``budget_bytes``. ``method`` is ``"dp"`` (exact when costs
    are integers with a gcd leaving at most ``max_cells`` budget units) or ``"greedy"``.
    The result never exceeds the budget; an infeasible budget raises ``ConfigError``.
    """
    layers = list(layers)
    if not layers:
        msg = "allocate_bits: argument 'layers' is empty"
        raise ConfigError(msg)
    for layer in layers:
        if not isinstance(layer, LayerChoice):
            msg = f"allocate_bits: 'layers' must hold LayerChoice objects, got {type(layer).__name__}"
            raise ConfigError(msg)
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        msg = f"argument 'max_cells' must be a positive int, got {max_cells!r}"
        raise ConfigError(msg)
    budget = _budget(layers, budget_bits_avg, budget_bytes)
    if method == "dp":
        choices, exact = _dp(layers, budget, max_cells)
        if not exact:  # grid-rounded costs leave slack: top it up, and keep the greedy answer if better
            choices = _greedy(layers, budget, choices)
            other = _greedy(layers, budget, _cheapest(layers, budget))
            if (
                _finish(layers, other, budget, False, method).total_error
                < _finish(layers, choices, budget, False, method).total_error
            ):
                choices = other
    elif method == "greedy":
        choices, exact = _greedy(layers, budget, _cheapest(layers, budget)), False
    else:
        msg = f"argument 'method' must be 'dp' or 'greedy', got {method!r}"
        raise ConfigError(msg)
    alloc = _finish(layers, choices, budget, exact, method)
    if not exact:
        alloc = _finish(layers, choices, budget, _certify(layers, budget, alloc.total_error), method)
    return alloc
