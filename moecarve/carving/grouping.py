"""Shared experts and balanced routed groups (tensors in, tensors out).

CMoE clusters neurons by their activation markers with a balanced k-means: every group holds
exactly m neurons. The balanced assignment is a transportation problem (n neurons, k groups of
capacity m, n = k * m); we solve it exactly on the n x k cost matrix instead of expanding it into
an n x n assignment problem as the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse
import torch


@dataclass
class Grouping:
    """Which intermediate neurons form which expert.

    shared: [N_s * m] neuron indices of the shared experts (ascending).
    experts: [k, m] neuron indices of each routed expert (each row ascending).
    representatives: [k] one neuron per routed expert, used by the analytic router.
    """

    shared: torch.Tensor
    experts: torch.Tensor
    representatives: torch.Tensor


def balanced_assignment(cost: torch.Tensor | np.ndarray, capacity: int) -> torch.Tensor:
    """Exact minimum-cost assignment of n items to k groups of exactly `capacity` items.

    cost: [n, k] with n == k * capacity. Returns labels [n] (int64) minimising
    sum_i cost[i, labels[i]]. Solved as a transportation LP with HiGHS' dual simplex: its
    constraint matrix is totally unimodular, so the optimal vertex is integral (checked).
    """
    c = np.asarray(cost.detach().cpu().double() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    n, k = c.shape
    if n != k * capacity:
        raise ValueError(f"balanced assignment needs n == k * capacity, got n={n}, k={k}, capacity={capacity}")
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    # variable v = i * k + j is "item i in group j"
    rows_item = np.repeat(np.arange(n), k)
    rows_group = n + np.tile(np.arange(k), n)
    cols = np.arange(n * k)
    a_eq = scipy.sparse.csr_matrix(
        (np.ones(2 * n * k), (np.concatenate([rows_item, rows_group]), np.concatenate([cols, cols]))),
        shape=(n + k, n * k),
    )
    b_eq = np.concatenate([np.ones(n), np.full(k, float(capacity))])
    # shift costs per item: the optimum is unchanged and the LP is better conditioned
    c = c - c.min(axis=1, keepdims=True)
    # presolve off: on this structure it costs 20x more than the dual simplex itself
    res = scipy.optimize.linprog(
        c.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs-ds", options={"presolve": False}
    )
    if res.status != 0:
        raise RuntimeError(f"balanced assignment LP failed: {res.message}")
    x = res.x.reshape(n, k)
    labels = x.argmax(axis=1)
    if not np.allclose(x.max(axis=1), 1.0, atol=1e-6):
        raise RuntimeError("balanced assignment LP returned a fractional solution")
    counts = np.bincount(labels, minlength=k)
    if not (counts == capacity).all():
        raise RuntimeError(f"balanced assignment produced unbalanced groups {counts.tolist()}")
    return torch.from_numpy(labels).long()


def l1_to_centroids(markers: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """L1 distance between binary marker columns and centroids: [T, n] x [T, k] -> [n, k].

    For a in {0, 1} and c in [0, 1], |a - c| = c + a (1 - 2c), so the whole distance matrix is
    one matmul instead of an [n, k, T] difference.
    """
    m = markers.float()
    return centroids.sum(dim=0, keepdim=True) + m.t() @ (1.0 - 2.0 * centroids)


def split_shared(rates: torch.Tensor, n_shared_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_shared_neurons most often active neurons (shared) and the rest, both ascending."""
    order = torch.argsort(rates, descending=True, stable=True)
    shared = order[:n_shared_neurons].sort().values
    rest = order[n_shared_neurons:].sort().values
    return shared, rest


def balanced_kmeans(
    markers: torch.Tensor, rates: torch.Tensor, k: int, iters: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means of n neurons on their marker columns (CMoE step 5).

    markers: [T, n] bool, rates: [n]. Initial centroids are the marker columns of the k most
    active neurons; each iteration solves the balanced assignment exactly and moves each
    centroid to its group mean. Returns (labels [n] in [0, k), centroids [T, k]).
    """
    n = markers.shape[1]
    m = n // k
    seeds = torch.argsort(rates, descending=True, stable=True)[:k]
    centroids = markers[:, seeds].float()
    labels = None
    for _ in range(iters):
        new = balanced_assignment(l1_to_centroids(markers, centroids), m)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels.to(markers.device), k).float()  # [n, k]
        centroids = (markers.float() @ onehot) / m
    return labels, centroids


def representatives(markers: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per group, the member whose marker column is closest (L1) to the centroid: [k] indices."""
    dist = l1_to_centroids(markers, centroids)  # [n, k]
    k = centroids.shape[1]
    own = dist.gather(1, labels.view(-1, 1).to(dist.device)).squeeze(1)  # [n]
    out = []
    for j in range(k):  # k is small; this runs once per layer
        members = torch.nonzero(labels == j).squeeze(1)
        out.append(members[own[members.to(own.device)].argmin().cpu()])
    return torch.stack(out)


def group_neurons(markers: torch.Tensor, rates: torch.Tensor, n_shared: int, n_routed: int, iters: int = 1) -> Grouping:
    """Shared split + balanced k-means of the rest into n_routed groups of m neurons.

    markers: [T, I] bool, rates: [I]. m = I / (n_shared + n_routed).
    """
    inter = markers.shape[1]
    m = inter // (n_shared + n_routed)
    shared, rest = split_shared(rates, n_shared * m)
    rest_markers = markers[:, rest.to(markers.device)]
    labels, centroids = balanced_kmeans(rest_markers, rates[rest.to(rates.device)], n_routed, iters)
    reps = representatives(rest_markers, labels, centroids)
    experts = torch.stack([rest[labels == j] for j in range(n_routed)])  # each ascending
    return Grouping(shared=shared, experts=experts, representatives=rest[reps])
