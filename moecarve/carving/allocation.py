"""Per-layer active budgets from per-layer sensitivity curves (tensors in, tensors out).

A carve at an active fraction f keeps, on average over tokens, f of each FFN's neurons. The same f
in every layer is one way to spend the budget; layers differ in how much the model loses when
their FFN keeps fewer neurons, so the budget goes further when sensitive layers keep more and
robust ones fewer, at the same total: the bytes read per token (every active neuron costs its
gate, up and down rows) stay those of the uniform carve.

`allocate` solves

    minimise  sum_l c_l(k_l)   subject to   sum_l k_l = round(f * sum_l n_l),   lo_l <= k_l <= hi_l

where k_l counts the active units of layer l (neurons, or experts of m neurons: every unit the
same number of bytes), n_l its units and c_l its cost curve (e.g. the loss increase measured on
calibration tokens), given at a grid of active fractions and interpolated linearly. On the lower
convex hull of each curve the marginal gain of one more unit never increases, so taking the
largest marginal gains over all layers is optimal for the hull (the greedy solution of a separable
convex resource allocation), and exact in the total.

Shapes: L layers, G grid points.
"""

from __future__ import annotations

import torch


def hull_gains(grid: torch.Tensor, cost: torch.Tensor, n: int) -> torch.Tensor:
    """Marginal gains [n] of units 1..n on the lower convex hull of one cost curve.

    grid [G]: increasing active fractions from 0 to 1; cost [G]: the cost at each. Unit j (1-based)
    gains c(j - 1) - c(j) on the hull through the points (grid * n, cost): a non-increasing sequence.
    """
    xs = (grid.double() * n).tolist()
    ys = cost.double().tolist()
    hull: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):  # monotone chain, lower hull (x increasing)
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (x - x0) >= (y - y0) * (x1 - x0):  # hull[-1] on or above the chord: drop it
                hull.pop()
            else:
                break
        hull.append((x, y))
    units = torch.arange(n + 1, dtype=torch.float64)
    hx = torch.tensor([p[0] for p in hull], dtype=torch.float64)
    hy = torch.tensor([p[1] for p in hull], dtype=torch.float64)
    seg = (torch.searchsorted(hx, units, right=True) - 1).clamp(0, len(hull) - 2)  # the segment of each unit
    slope = (hy[seg + 1] - hy[seg]) / (hx[seg + 1] - hx[seg])
    value = hy[seg] + slope * (units - hx[seg])  # the hull at 0..n
    return value[:-1] - value[1:]


def allocate(
    costs: torch.Tensor,
    grid: torch.Tensor,
    units: torch.Tensor,
    fraction: float,
    lo: float | torch.Tensor = 0.0,
    hi: float | torch.Tensor = 1.0,
    pull: float | None = None,
) -> torch.Tensor:
    """Active units per layer [L] (int64) minimising the summed hull costs at the exact total.

    Args:
        costs: [L, G] each layer's cost at the active fractions `grid` (lower is better; a curve
            that does not decrease with more units is flat on its hull and gets only its minimum).
        grid: [G] increasing fractions, grid[0] = 0 and grid[-1] = 1.
        units: [L] units per layer (neurons, or experts: every unit costs the same bytes).
        fraction: the requested average active fraction; the units returned sum to exactly
            round(fraction * units.sum()).
        lo, hi: per-layer bounds on the active fraction (scalars or [L]); layer l keeps between
            ceil(lo * n_l) and floor(hi * n_l) units.
        pull: adds pull * (grid - fraction)^2 to every curve, a convex pull towards the uniform
            allocation in the costs' own units: it shrinks noisy curves towards uniform and sends
            equal curves to it. None: 1e-6 of the largest |cost|, which only breaks ties.
    Returns:
        k [L] int64 with sum(k) == round(fraction * sum(units)); gains still equal after the pull
        go to the earlier layer, so the result is deterministic.
    Raises:
        ValueError: shapes that do not match, a grid that does not span [0, 1], or bounds that
        cannot hold the total.
    """
    if costs.dim() != 2 or grid.dim() != 1 or costs.shape[1] != grid.shape[0] or units.shape != (costs.shape[0],):
        raise ValueError(f"costs [L, G], grid [G] and units [L] do not match: {tuple(costs.shape)}, "
                         f"{tuple(grid.shape)}, {tuple(units.shape)}")  # fmt: skip
    if grid.shape[0] < 2 or float(grid[0]) != 0.0 or float(grid[-1]) != 1.0 or not bool((grid.diff() > 0).all()):
        raise ValueError("grid must increase from 0 to 1")
    if not bool(torch.isfinite(costs).all()):
        raise ValueError("costs must be finite")
    L = costs.shape[0]
    if pull is None:
        pull = 1e-6 * max(float(costs.abs().max()), 1e-30)
    costs = costs.double() + pull * (grid.double() - fraction).pow(2)
    n = units.long()
    lo_t = torch.as_tensor(lo, dtype=torch.float64).expand(L)
    hi_t = torch.as_tensor(hi, dtype=torch.float64).expand(L)
    k_lo = torch.ceil(lo_t * n - 1e-9).long().clamp(0)
    k_hi = torch.minimum(torch.floor(hi_t * n + 1e-9).long(), n)
    total = round(fraction * int(n.sum()))
    if bool((k_lo > k_hi).any()) or not int(k_lo.sum()) <= total <= int(k_hi.sum()):
        raise ValueError(f"the bounds cannot hold {total} active units (between {int(k_lo.sum())} and {int(k_hi.sum())})")
    width = int(n.max())
    gains = torch.full((L, width), float("-inf"), dtype=torch.float64)
    for layer in range(L):
        gains[layer, : n[layer]] = hull_gains(grid, costs[layer], int(n[layer]))
    j = torch.arange(width).expand(L, width)
    forced = j < k_lo[:, None]  # always taken: below the layer's lower bound
    allowed = ~forced & (j < k_hi[:, None])
    free = total - int(k_lo.sum())
    # the `free` largest gains among the allowed units; a stable sort of the layer-major flat order
    # gives ties to the earlier layer, and within a layer to the earlier unit (a prefix, as the
    # hull's gains never increase)
    score = torch.where(allowed, gains, torch.full_like(gains, float("-inf"))).flatten()
    order = torch.sort(score, descending=True, stable=True).indices[:free]
    taken = torch.bincount(order // width, minlength=L)
    return k_lo + taken


def dropped_energy(h: torch.Tensor, down: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Output energy an FFN loses when each token keeps only its top neurons by |h|.

    h [T, I]: activations; down [d, I]: the down projection; keep [G]: neurons kept (ints in
    0..I). Returns [G] float64: sum over tokens of sum_{i dropped} h_ti^2 ||down_i||^2 for each count
    (the squared norm of the lost output, cross terms between neurons left out).
    """
    e = h.float().pow(2) * down.float().pow(2).sum(dim=0)  # [T, I] each neuron's output energy
    order = h.abs().argsort(dim=1, descending=True)
    cum = torch.cat([torch.zeros(h.shape[0], 1), e.gather(1, order).cumsum(dim=1).cpu()], dim=1)  # [T, I + 1]
    return (cum[:, -1:] - cum[:, keep.long().cpu()]).sum(dim=0).double()


def sensitivity_costs(slopes: torch.Tensor, energy: torch.Tensor, at: int, power: float = 0.5) -> torch.Tensor:
    """Cost curves [L, G] from each layer's measured loss slope and its dropped-energy curve.

    slopes [L]: the loss the dropped part of each layer costs at the uniform operating point (the
    derivative of the calibration loss with respect to a factor on the dropped part, sign turned:
    > 0 where dropping hurts). energy [L, G]: dropped_energy on the allocation grid; `at`: the grid
    index of the operating point. c_l = slope_l * (E_l / E_l[at])^power: the measured cost where it
    was measured, scaled along the grid as the lost output's norm (power 0.5) scales.
    """
    ref = energy[:, at : at + 1].clamp_min(1e-30)
    return slopes.double().clamp_min(0.0)[:, None] * (energy.double() / ref).clamp_min(0.0).pow(power)
