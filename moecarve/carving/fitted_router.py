"""A router fitted in closed form on the calibration activations (tensors in, tensors out).

Score of expert e:  s_e(x) = w_e . [x ; |h_P(x)|] + b_e,  where h_P are the activations of a few
"probe" neurons (each expert's most active members, the analytic router's representative
generalised to r per expert). w, b are a ridge regression of each expert's share of the token's
|h| mass (the oracle's ranking signal) on those features; the ridge strength is chosen by the
oracle recall on held-out calibration tokens. No backpropagation: one [F, F] solve per strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ffn import DenseFFN
from .grouping import Grouping
from .oracle import expert_mass, oracle_indices, router_recall

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class FittedRouter:
    """Router tensors ready for modules.moe.FittedRouter (see build_moe) and what the fit measured."""

    tensors: dict[str, torch.Tensor | None]
    ridge: float
    heldout_recall: float


def probe_neurons(h_abs: torch.Tensor, grouping: Grouping, per_expert: int) -> torch.Tensor:
    """Each routed expert's `per_expert` members with the largest mean |h|: [E * r] neuron indices."""
    if per_expert == 0:
        return torch.zeros(0, dtype=torch.long)
    mean = h_abs.mean(dim=0).cpu()
    top = mean[grouping.experts].topk(per_expert, dim=-1).indices  # [E, r]
    return grouping.experts.gather(1, top).reshape(-1)


def probe_rows(ffn: DenseFFN, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The probes' input rows [2R, d] (gate rows then up rows) or [R, d], and their biases or None."""
    p = probes.to(ffn.up.device)
    if ffn.gated:
        rows = torch.cat([ffn.gate[p], ffn.up[p]], dim=0)
        if not ffn.has_in_bias:
            return rows, None
        zero = torch.zeros(p.numel(), dtype=ffn.up.dtype, device=ffn.up.device)
        gb = zero if ffn.gate_bias is None else ffn.gate_bias[p]
        ub = zero if ffn.up_bias is None else ffn.up_bias[p]
        return rows, torch.cat([gb, ub])
    return ffn.up[p], None if ffn.up_bias is None else ffn.up_bias[p]


def _ridge(f: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||f W - y||^2 + lam * n * ||W||^2 for standardised features f [n, F], y [n, E] -> [F, E]."""
    gram = f.t() @ f
    gram.diagonal().add_(lam * f.shape[0])
    return torch.linalg.solve(gram, f.t() @ y)


@torch.no_grad()
def fit_router(
    ffn: DenseFFN, grouping: Grouping, x: torch.Tensor, h: torch.Tensor, top_k: int, per_expert: int,
    holdout: float = 0.25,
) -> FittedRouter:
    """Fit the scores on x [T, d] with dense activations h [T, I]; returns tensors
    {"weight": [E, d + R], "bias": [E], "probe": [2R, d] or [R, d] or None, "probe_bias": [..] or None}."""
    h_abs = h.abs().float()
    mass = expert_mass(h_abs, grouping.experts)  # [T, E]
    target = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    probes = probe_neurons(h_abs, grouping, per_expert)
    feats = [x.float()]
    if probes.numel():
        feats.append(h_abs[:, probes.to(h.device)])
    f = torch.cat(feats, dim=-1)  # [T, F]
    mu, sd = f.mean(dim=0), f.std(dim=0).clamp_min(1e-6)
    fz = torch.cat([(f - mu) / sd, torch.ones(f.shape[0], 1, device=f.device)], dim=-1)  # intercept column

    T = x.shape[0]
    n_fit = max(1, int(T * (1 - holdout))) if holdout > 0 else T
    best_lam, best_rec = RIDGE_GRID[0], -1.0
    if n_fit < T:  # strength chosen on the held-out tail: the oracle recall of the fitted scores
        oracle = oracle_indices(mass[n_fit:], top_k)
        for lam in RIDGE_GRID:
            w = _ridge(fz[:n_fit], target[:n_fit], lam)
            rec = router_recall(oracle_indices(fz[n_fit:] @ w, top_k), oracle, mass.shape[1])
            if rec > best_rec:
                best_lam, best_rec = lam, rec
    w = _ridge(fz, target, best_lam)  # [F + 1, E] refit on every token
    weight = (w[:-1] / sd.unsqueeze(1)).t().contiguous()  # fold the standardisation back in: [E, F]
    bias = w[-1] - (mu / sd) @ w[:-1]  # [E]
    rows, rows_bias = probe_rows(ffn, probes) if probes.numel() else (None, None)
    tensors = {"weight": weight, "score_bias": bias, "probe": rows, "probe_bias": rows_bias}
    return FittedRouter(tensors=tensors, ridge=best_lam, heldout_recall=best_rec)
