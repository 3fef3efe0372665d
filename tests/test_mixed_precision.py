"""Bit allocation (qpass.quant.allocation): DP exact vs brute force, greedy never better."""

from __future__ import annotations

import random
import time

import pytest

from qpass.errors import ConfigError
from qpass.formats import get_format
from qpass.quant.allocation import (
    Allocation,
    Candidate,
    LayerChoice,
    allocate_bits,
    brute_force,
    storage_bits,
)


def random_layers(rng: random.Random, integer: bool) -> list[LayerChoice]:
    layers = []
    for li in range(rng.randint(1, 5)):
        cands = []
        for k in range(rng.randint(1, 4)):
            bits = rng.randint(1, 40) if integer else rng.uniform(0.5, 40.0)
            cands.append(Candidate(f"c{k}", bits, rng.uniform(0.0, 10.0)))
        layers.append(LayerChoice(f"l{li}", tuple(cands), n_weights=rng.randint(1, 8)))
    return layers


def _feasible_budget(rng: random.Random, layers: list[LayerChoice]) -> float:
    lo = sum(min(c.bits for c in layer.candidates) for layer in layers)
    hi = sum(max(c.bits for c in layer.candidates) for layer in layers)
    return rng.uniform(lo, hi + 1.0)


def _check_fits(alloc: Allocation, layers: list[LayerChoice], budget: float) -> None:
    cands = [layer.candidates[k] for layer, k in zip(layers, alloc.choices, strict=True)]
    assert alloc.total_bits == pytest.approx(sum(c.bits for c in cands))
    assert alloc.total_error == pytest.approx(sum(c.error for c in cands))
    assert alloc.total_bits <= budget + 1e-9


@pytest.mark.parametrize("integer", [True, False], ids=["integer_costs", "real_costs"])
def test_dp_equals_brute_force_and_greedy_never_better(integer):
    rng = random.Random(0 if integer else 1)
    for _ in range(300):
        layers = random_layers(rng, integer)
        budget = _feasible_budget(rng, layers)
        ref = brute_force(layers, budget)
        assert ref is not None
        dp = allocate_bits(layers, budget_bytes=budget / 8, method="dp", max_cells=4000)
        greedy = allocate_bits(layers, budget_bytes=budget / 8, method="greedy")
        _check_fits(dp, layers, budget)
        _check_fits(greedy, layers, budget)
        assert greedy.total_error >= dp.total_error - 1e-12
        if integer:  # exact DP: equal to brute force, and says so
            assert dp.is_optimal
            assert dp.total_error == pytest.approx(ref[1], abs=1e-12)
        else:  # costs rounded up to the grid: never better than the optimum, flagged honestly
            assert dp.total_error >= ref[1] - 1e-12
            assert dp.is_optimal == (dp.total_error <= ref[1] + 1e-12)
        assert greedy.is_optimal == (greedy.total_error <= ref[1] + 1e-12)


def test_budget_bits_avg_and_storage_bits():
    shape = (256, 1024)
    n = shape[0] * shape[1]
    assert storage_bits(get_format("int4", group_size=128), shape) == n * 4 + n // 128 * 16
    assert storage_bits(get_format("uint4", group_size=128), shape) == n * 4 + n // 128 * (16 + 4)
    assert storage_bits(get_format("int8"), shape) == n * 8 + 256 * 16
    assert storage_bits(get_format("mxfp4"), shape) == n * 4 + n // 32 * 8
    fmts = {"int3": get_format("int3"), "int4": get_format("int4"), "int8": get_format("int8")}
    errs = {"int3": 1.5, "int4": 1.0, "int8": 0.01}  # layer i's sensitivity is scaled by i + 1
    layers = [
        LayerChoice(
            f"layer{i}",
            tuple(Candidate(k, storage_bits(fmts[k], shape), errs[k] * (i + 1)) for k in fmts),
            n_weights=n,
        )
        for i in range(6)
    ]
    alloc = allocate_bits(layers, budget_bits_avg=4.5)
    assert alloc.is_optimal and alloc.total_bits <= 4.5 * 6 * n
    assert alloc.avg_bits(6 * n) <= 4.5
    assert set(alloc.labels) <= set(fmts) and "int8" in alloc.labels  # mixed, not uniform
    assert len(alloc.report()) == 6 and alloc.report()[0]["layer"] == "layer0"
    uniform4 = sum(layer.candidates[1].error for layer in layers)
    assert alloc.total_error < uniform4  # beats uniform INT4 at the same budget


def test_large_problem_is_fast_and_within_budget():
    rng = random.Random(3)
    layers = []
    for li in range(224):  # 32 blocks x 7 linears
        n = rng.choice([4096 * 4096, 4096 * 11008, 1024 * 4096])
        cands = tuple(
            Candidate(f"b{b}", n * b + n // 128 * 16, rng.uniform(0.5, 1.5) * 4.0 ** (-b))
            for b in (2, 3, 4, 8)
        )
        layers.append(LayerChoice(f"l{li}", cands, n_weights=n))
    t = time.perf_counter()
    dp = allocate_bits(layers, budget_bits_avg=4.25, max_cells=200_000)  # exact: cost gcd 2^17 bits
    greedy = allocate_bits(layers, budget_bits_avg=4.25, method="greedy")
    grid = allocate_bits(layers, budget_bits_avg=4.25, max_cells=20_000)  # rounded grid + top-up
    assert time.perf_counter() - t < 20
    assert dp.is_optimal and not greedy.is_optimal and not grid.is_optimal
    assert dp.total_error <= grid.total_error <= greedy.total_error
    total_w = sum(layer.n_weights for layer in layers)
    assert dp.total_bits <= 4.25 * total_w and greedy.total_bits <= 4.25 * total_w


def test_errors():
    layers = [LayerChoice("a", (Candidate("x", 8, 1.0), Candidate("y", 16, 0.5)), n_weights=4)]
    with pytest.raises(ConfigError, match="budget"):
        allocate_bits(layers, budget_bytes=0.5)  # 4 bits < the cheapest 8
    with pytest.raises(ConfigError, match="budget_bits_avg"):
        allocate_bits(layers, budget_bits_avg=4, budget_bytes=2)
    with pytest.raises(ConfigError, match="budget_bits_avg"):
        allocate_bits(layers)
    with pytest.raises(ConfigError, match="n_weights"):
        allocate_bits([LayerChoice("b", (Candidate("x", 8, 1.0),))], budget_bits_avg=4)
    with pytest.raises(ConfigError, match="method"):
        allocate_bits(layers, budget_bytes=2, method="ilp")
    with pytest.raises(ConfigError, match="candidates"):
        LayerChoice("c", ())
    with pytest.raises(ConfigError, match="error"):
        Candidate("x", 8, float("nan"))
    with pytest.raises(ConfigError, match="layers"):
        allocate_bits([], budget_bytes=2)
