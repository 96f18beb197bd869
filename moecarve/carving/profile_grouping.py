"""Co-activation grouping on |h| profiles (tensors in, tensors out).

CMoE groups neurons by binary top-k markers; here each neuron is described by its |h| profile over
the calibration tokens (a column of |h| [T]), L2-normalised so that neurons that fire on the same
tokens are close whatever their scale. Balanced k-means (exact transportation assignment, several
iterations) then packs co-active neurons into the same expert, so that few experts hold most of a
token's |h| mass and top-A routing over them loses little.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouping import Grouping, balanced_assignment


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


def group_by_profiles(
    h: torch.Tensor, n_shared: int, n_routed: int, iters: int, seed: int = 0, down: torch.Tensor | None = None
) -> Grouping:
    """Shared experts = the neurons with the largest mean |h|; the rest grouped by balanced profile k-means.

    h: [T, I] activations on the calibration tokens. Representatives (used by no fitted router)
    are each group's member with the largest mean |h|.
    """
    inter = h.shape[1]
    m = inter // (n_shared + n_routed)
    mean = mean_mass(h, down)  # [I]
    order = torch.argsort(mean, descending=True, stable=True).cpu()
    shared = order[: n_shared * m].sort().values
    rest = order[n_shared * m :].sort().values
    labels = balanced_profile_kmeans(mass_profiles(h, down, rest), n_routed, iters, seed)  # on [T, I - S*m]
    experts = torch.stack([rest[labels == j] for j in range(n_routed)])  # [E, m], rows ascending
    reps = torch.stack([row[mean.cpu()[row].argmax()] for row in experts])
    return Grouping(shared=shared, experts=experts, representatives=reps)
