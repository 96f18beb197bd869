"""Per-layer budgets (moecarve.carving.allocation): exact totals, bounds, optimality on the hull."""

from __future__ import annotations

import itertools

import pytest
import torch

from moecarve.carving.allocation import allocate, hull_gains

GRID = torch.linspace(0, 1, 9)


def curves(weights, power=2.0):
    """Convex decreasing costs w * (1 - f)^power at GRID for each weight: [L, G]."""
    return torch.stack([w * (1 - GRID).pow(power) for w in weights])


@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.3, 0.5, 0.9])
def test_total_is_exact_and_bounds_hold(fraction):
    g = torch.Generator().manual_seed(0)
    costs = curves(torch.rand(7, generator=g).tolist())
    units = torch.tensor([64, 64, 48, 64, 32, 64, 64])
    lo, hi = fraction / 2, min(1.0, 2 * fraction)
    k = allocate(costs, GRID, units, fraction, lo=lo, hi=hi)
    assert k.dtype == torch.int64 and k.shape == (7,)
    assert int(k.sum()) == round(fraction * int(units.sum()))
    assert bool((k >= torch.ceil(lo * units - 1e-9)).all()) and bool((k <= torch.floor(hi * units + 1e-9)).all())


def test_equal_curves_give_the_uniform_allocation():
    units = torch.full((5,), 40)
    for costs in (curves([1.0] * 5), torch.zeros(5, 9), torch.ones(5, 9)):
        assert allocate(costs, GRID, units, 0.25).tolist() == [10] * 5


def test_the_steeper_layer_keeps_more():
    units = torch.full((3,), 100)
    k = allocate(curves([1.0, 2.0, 4.0]), GRID, units, 0.25)
    assert k[0] < k[1] < k[2]
    # scaling every curve by the same factor changes nothing: only their ratios matter
    assert torch.equal(allocate(curves([10.0, 20.0, 40.0]), GRID, units, 0.25), k)


def hull_cost(costs_row: torch.Tensor, n: int, k: int) -> float:
    """The hull of one curve at k units, from hull_gains: c(0) - sum of the first k gains."""
    return float(costs_row[0]) - float(hull_gains(GRID, costs_row, n)[:k].sum())


def test_optimal_against_brute_force():
    """Every allocation of the total within the bounds costs at least what allocate's does (on the hulls)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        costs = torch.rand(3, 9, generator=g).sort(dim=1, descending=True).values * torch.rand(3, 1, generator=g)
        units = torch.tensor([6, 8, 6])
        k = allocate(costs, GRID, units, 0.5, pull=0.0)
        got = sum(hull_cost(costs[i], int(units[i]), int(k[i])) for i in range(3))
        total = round(0.5 * int(units.sum()))
        best = min(
            sum(hull_cost(costs[i], int(units[i]), c[i]) for i in range(3))
            for c in itertools.product(*(range(int(n) + 1) for n in units))
            if sum(c) == total
        )
        assert got == pytest.approx(best, abs=1e-9), trial


def test_hull_gains_do_not_increase_and_add_up():
    cost = torch.tensor([5.0, 4.0, 4.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # not convex: the hull bridges the bump
    gains = hull_gains(GRID, cost, 16)
    assert gains.shape == (16,)
    assert bool((gains[1:] <= gains[:-1] + 1e-12).all())
    assert float(gains.sum()) == pytest.approx(float(cost[0] - cost[-1]))
    # a point on the hull is reproduced exactly: 1.0 at 3/8 of the units
    assert float(cost[0] - gains[:6].sum()) == pytest.approx(1.0)


def test_a_large_pull_gives_uniform_and_no_pull_follows_the_costs():
    units = torch.full((4,), 64)
    costs = curves([1.0, 1.0, 1.0, 8.0])
    assert allocate(costs, GRID, units, 0.25, pull=1e6).tolist() == [16] * 4
    assert allocate(costs, GRID, units, 0.25, pull=0.0)[3] > 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid": torch.linspace(0.1, 1, 9)}, "grid must increase from 0 to 1"),
        ({"units": torch.tensor([10, 10])}, "do not match"),
        ({"lo": 0.5}, "cannot hold"),
        ({"hi": 0.1}, "cannot hold"),
        ({"costs": torch.full((3, 9), float("nan"))}, "finite"),
    ],
)
def test_bad_inputs_are_refused(kwargs, match):
    args = {"costs": curves([1.0, 2.0, 3.0]), "grid": GRID, "units": torch.tensor([10, 10, 10]), "fraction": 0.25}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        allocate(**args)


def test_dropped_energy_is_the_lost_output_energy_of_the_top_k():
    from moecarve.carving.allocation import dropped_energy

    g = torch.Generator().manual_seed(2)
    h, down = torch.randn(50, 12, generator=g), torch.randn(6, 12, generator=g)
    keep = torch.tensor([0, 3, 12])
    got = dropped_energy(h, down, keep)
    for j, k in enumerate(keep.tolist()):
        want = 0.0
        for t in range(50):
            dropped = h[t].abs().argsort(descending=True)[k:]
            want += float((h[t, dropped].pow(2) * down[:, dropped].pow(2).sum(0)).sum())
        assert float(got[j]) == pytest.approx(want, rel=1e-5)
    assert float(got[-1]) == 0.0  # keeping everything loses nothing


def test_sensitivity_costs_scale_the_measured_slope_along_the_energy_curve():
    from moecarve.carving.allocation import sensitivity_costs

    energy = torch.tensor([[16.0, 4.0, 1.0, 0.0], [16.0, 4.0, 1.0, 0.0]])
    costs = sensitivity_costs(torch.tensor([2.0, -1.0]), energy, at=1)
    assert costs[0].tolist() == [4.0, 2.0, 1.0, 0.0]  # the slope at the operating point, sqrt of the energy ratio
    assert costs[1].tolist() == [0.0] * 4  # a layer whose dropped part does not cost: nothing to protect


def test_sensitivity_allocation_keeps_the_total_and_is_recorded():
    import moecarve
    from moecarve.carve import ALLOCATION_BOUNDS

    from .conftest import random_windows, tiny_model

    cfg = moecarve.CarveConfig.from_granularity(128, 1, 0.25, allocation="sensitivity")
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        report = moecarve.carve(model, cfg, random_windows(4, 64), device="cpu", progress=False)
        runs.append(report.config.layer_active)
    budgets = runs[0]
    assert runs[1] == budgets  # deterministic
    assert sum(budgets) == cfg.n_active * len(budgets)  # the uniform total: the same bytes per token
    lo, hi = ALLOCATION_BOUNDS
    assert all(lo * cfg.n_active <= a <= hi * cfg.n_active for a in budgets)
    assert report.allocation_seconds > 0 and report.active_fraction == pytest.approx(0.25)
    # each layer's A: what its router picks per token (on average: the default threshold selection caps it at 2A)
    picked = [m.spec.mean_active or m.spec.top_k for m in model.modules() if type(m).__name__ == "CarvedMoE"]
    assert tuple(picked) == budgets
    assert tuple(model.config.moecarve["carve"]["layer_active"]) == budgets  # saved with the folder
    # given by hand, the budgets are used as they are (no measurement)
    fixed = cfg.replace(layer_active=(40, 24))
    report = moecarve.carve(tiny_model("llama"), fixed, random_windows(4, 64), device="cpu", progress=False)
    assert report.config.layer_active == (40, 24) and report.allocation_seconds == 0.0
