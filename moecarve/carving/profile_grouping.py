"""Co-activation grouping on |h| profiles (tensors in, tensors out).

CMoE groups neurons by binary top-k markers; here each neuron is described by its |h| profile over
the calibration tokens (a column of |h| [T]), L2-normalised so that neurons that fire on the same
tokens are close whatever their scale. Balanced k-means (exact transportation assignment, several
iterations) then packs co-active neurons into the same expert, so that few experts hold most of a
token's |h| mass and top-A routing over them loses little.

Fine experts (many groups of a few neurons): the exact transportation assignment has n * k
variables (30M for a 7B layer at m = 4), so past LP_MAX_VARIABLES the groups come from recursive
balanced bisection instead: every split is a balanced 2-means whose assignment step is solved
exactly (by sorting), every group still holds exactly m neurons. At m = 1 there is nothing to group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouping import Grouping, balanced_assignment

LP_MAX_VARIABLES = 1_000_000  # n * k above which the groups come from balanced_bisection (an LP of
# 600k variables takes ~2 s per k-means iteration)
SKETCH_ABOVE = 50_000_000  # profile elements above which the bisection splits a random sketch of them
SKETCH_DIM = 256


def mass_profiles(h: torch.Tensor, down: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> torch.Tensor:
    """|h| [T, I] (or its `columns` [T, n]), optionally weighted by each neuron's down_proj column
    norm (its output scale). A new float32 tensor: the caller's scratch copy."""
    a = (h.abs() if columns is None else h[:, columns.to(h.device)].abs_()).float()  # indexing copies: abs_ is safe
    if down is not None:
        norm = down.float().norm(dim=0)
        a.mul_(norm if columns is None else norm[columns.to(norm.device)])
    return a


def mean_mass(h: torch.Tensor, down: torch.Tensor | None = None, width: int = 256) -> torch.Tensor:
    """Mean of mass_profiles(h, down) over tokens [I], `width` columns at a time: no [T, I] copy.

    Column blocks (not token chunks) keep each column's reduction as in one whole-tensor mean.
    """
    cols = torch.arange(h.shape[1], device=h.device)
    return torch.cat([mass_profiles(h, down, c).mean(dim=0) for c in cols.split(width)])


def balanced_profile_kmeans(profiles: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Balanced k-means of n neurons on their profiles [T, n] -> labels [n] in [0, k), k groups of n/k.

    The profiles are L2-normalised per column in place (they are the caller's scratch copy).
    Centroids start at k distinct neurons picked by farthest-point seeding (deterministic given the
    seed); each iteration assigns neurons to centroids exactly (max total cosine similarity under the
    equal-size constraint) and moves each centroid to its members' normalised mean.
    """
    n = profiles.shape[1]
    m = n // k
    z = profiles.div_(profiles.norm(dim=0).clamp_min(1e-12))  # [T, n] unit columns, as F.normalize
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    seeds = [first]
    best = (z.t() @ z[:, first]).cpu()  # [n] similarity to the nearest seed
    for _ in range(k - 1):
        nxt = int(best.argmin())
        seeds.append(nxt)
        best = torch.maximum(best, (z.t() @ z[:, nxt]).cpu())
    centroids = z[:, seeds]  # [T, k]
    labels = None
    for _ in range(iters):
        new = balanced_assignment(-(z.t() @ centroids), m)  # [n]
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = F.one_hot(labels.to(z.device), k).float()  # [n, k]
        centroids = F.normalize(z @ onehot, dim=0)
    return labels


def balanced_bisection(profiles: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Balanced partition of n neurons on their profiles [T, n] -> labels [n] in [0, k), k groups of n/k.

    Recursive: a set holding g groups splits into g//2 and g - g//2 groups of exactly m neurons
    each, by a balanced 2-means whose assignment step is exact (with centroids c1, c2 fixed, the n1
    neurons with the largest cos(z, c1) - cos(z, c2) go left: that maximises the total similarity
    under the size constraint). Centroids start at the neuron farthest from the set's mean and the
    one farthest from it. Profiles larger than SKETCH_ABOVE elements (a 7B layer on 8x2048 tokens)
    are first projected onto SKETCH_DIM random directions, which keeps the cosines the splits compare
    and makes every split cheap. Profiles are normalised in place (the caller's scratch copy).
    """
    n = profiles.shape[1]
    m = n // k
    z = profiles.div_(profiles.norm(dim=0).clamp_min(1e-12))  # [T, n] unit columns
    if z.numel() > SKETCH_ABOVE:  # a 7B layer on 8x2048 tokens: split on a random sketch of the profiles
        g = torch.Generator().manual_seed(0)
        sketch = torch.randn(SKETCH_DIM, z.shape[0], generator=g).to(z.device) / SKETCH_DIM**0.5
        z = F.normalize(sketch @ z, dim=0)  # [r, n]: cosines kept to ~1/sqrt(r) (Johnson-Lindenstrauss)
    labels = torch.empty(n, dtype=torch.long)
    todo = [(torch.arange(n, device=z.device), 0, k)]  # (neurons, first label, groups)
    while todo:
        items, first, g = todo.pop()
        if g == 1:
            labels[items.cpu()] = first
            continue
        zi = z[:, items]  # [T, n_i]
        n1 = (g // 2) * m
        c1 = zi[:, int((zi.t() @ zi.mean(dim=1)).argmin())]
        c2 = zi[:, int((zi.t() @ c1).argmin())]
        left = None
        for _ in range(iters):
            order = torch.argsort(zi.t() @ (c2 - c1), stable=True)  # most "left" first
            new = order[:n1].sort().values
            if left is not None and torch.equal(new, left):
                break
            left = new
            mask = torch.zeros(items.shape[0], dtype=torch.bool, device=z.device)
            mask[left] = True
            c1 = F.normalize(zi[:, mask].sum(dim=1), dim=0)
            c2 = F.normalize(zi[:, ~mask].sum(dim=1), dim=0)
        mask = torch.zeros(items.shape[0], dtype=torch.bool, device=z.device)
        mask[left] = True
        todo.append((items[~mask], first + g // 2, g - g // 2))
        todo.append((items[mask], first, g // 2))
    return labels


def group_by_profiles(
    h: torch.Tensor, n_shared: int, n_routed: int, iters: int, seed: int = 0, down: torch.Tensor | None = None
) -> Grouping:
    """Shared experts = the neurons with the largest mean |h|; the rest grouped by balanced profile k-means.

    h: [T, I] activations on the calibration tokens. Representatives (used by no fitted router)
    are each group's member with the largest mean |h|.
    """
    inter = h.shape[1]
    m = inter // (n_shared + n_routed)
    mean = mean_mass(h, down).cpu()  # [I]
    order = torch.argsort(mean, descending=True, stable=True)
    shared = order[: n_shared * m].sort().values
    rest = order[n_shared * m :].sort().values
    if m == 1:  # single-neuron experts: the partition is fixed
        experts = rest.view(-1, 1)
        return Grouping(shared=shared, experts=experts, representatives=rest.clone())
    profiles = mass_profiles(h, down, rest)  # [T, I - S*m]
    if rest.numel() * n_routed > LP_MAX_VARIABLES:
        labels = balanced_bisection(profiles, n_routed, iters)
    else:
        labels = balanced_profile_kmeans(profiles, n_routed, iters, seed)
    del profiles
    experts = rest[torch.argsort(labels, stable=True)].view(n_routed, m)  # [E, m], rows ascending
    reps = experts.gather(1, mean[experts].argmax(dim=1, keepdim=True)).squeeze(1)
    return Grouping(shared=shared, experts=experts, representatives=reps)
