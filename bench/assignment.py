"""Balanced assignment: moecarve's exact transportation LP vs the reference's n x n expansion.

    python bench/assignment.py [--n 9632] [--k 14] [--tokens 4096] [--skip-lap]
    python bench/assignment.py --fine [--n 11008] [--k 2752] [--tokens 16384]   # tiny experts

A 7B layer at S2A2E16 has n = 11008 - 2 * 688 = 9632 routed neurons in k = 14 groups of m = 688.
Costs are L1 distances between sparse binary activation markers and k centroid columns, as in
CMoE. The reference code expands the n x k costs into an n x n matrix (each column repeated m
times) and runs LAPJV; we time scipy's linear_sum_assignment on the same expansion.

--fine: tiny experts (a 7B layer at m = 4: n = 11008 neurons in k = 2752 groups), where the LP
would have n * k = 30M variables: the "fitted" method's recursive balanced bisection
(moecarve.carving.profile_grouping.balanced_bisection) on |h|-like profiles [tokens, n], 10
iterations per split; checks every group holds exactly m neurons.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.optimize
import torch

from moecarve.carving.grouping import balanced_assignment, l1_to_centroids
from moecarve.carving.profile_grouping import balanced_bisection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=9632)
    ap.add_argument("--k", type=int, default=14)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--skip-lap", action="store_true", help="only time moecarve's solver")
    ap.add_argument("--fine", action="store_true", help="tiny experts: time the balanced bisection")
    args = ap.parse_args()
    n, k, m = args.n, args.k, args.n // args.k
    g = torch.Generator().manual_seed(0)
    if args.fine:
        profiles = torch.rand(args.tokens, n, generator=g).pow_(8)  # heavy-tailed, like |h|
        t = time.perf_counter()
        labels = balanced_bisection(profiles, k, iters=10)
        counts = torch.bincount(labels, minlength=k)
        print(f"balanced bisection of {n} neurons into {k} groups of {m} on {args.tokens} tokens "
              f"({torch.get_num_threads()} threads): {time.perf_counter() - t:.1f} s, "
              f"every group exactly {m}: {bool((counts == m).all())}")  # fmt: skip
        return
    markers = torch.rand(args.tokens, n, generator=g) < 10 / 11008  # K_a = 10 of 11008 neurons per token
    seeds = torch.randperm(n, generator=g)[:k]
    cost = l1_to_centroids(markers, markers[:, seeds].float()).double().numpy()

    t = time.perf_counter()
    labels = balanced_assignment(cost, m).numpy()
    t_ours = time.perf_counter() - t
    ours = cost[np.arange(n), labels].sum()
    print(f"moecarve transportation LP (n x k = {n} x {k}): {t_ours:.2f} s, cost {ours:.1f}")
    if args.skip_lap:
        return
    t = time.perf_counter()
    expanded = np.repeat(cost, m, axis=1)  # n x n, as the reference code builds it
    rows, cols = scipy.optimize.linear_sum_assignment(expanded)
    t_lap = time.perf_counter() - t
    print(f"linear_sum_assignment on the n x n expansion ({n} x {n}, {expanded.nbytes / 2**20:.0f} MiB): {t_lap:.2f} s, cost {expanded[rows, cols].sum():.1f}")
    print(f"speed-up {t_lap / t_ours:.0f}x, same optimum: {abs(expanded[rows, cols].sum() - ours) < 1e-6}")


if __name__ == "__main__":
    main()
