"""Least-squares refit of down_proj on the routed activations (tensors in, tensors out).

After carving, a token's output is down(h * keep) with keep the shared neurons plus its selected
experts' neurons. Hard zeroing of the rest biases the output; we refit the down projection so
that the carved output best matches the dense FFN output on the calibration inputs:

    W = argmin ||H_k W^T - Y||^2 + lam ||W - W_0||^2,   H_k = h * keep [T, I],  Y = h W_0^T [T, d]

(ridge towards the original weights, so neurons the calibration rarely selects keep theirs). The
inputs x are the carved model's own (layers are carved in order), as in GPTQ; lam is picked by
the relative error on held-out calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class Refit:
    down: torch.Tensor  # [d, I] the refitted down projection (float32)
    ridge: float  # the chosen lam, relative to the mean diagonal of H_k^T H_k
    heldout_before: float  # relative squared error on held-out tokens with W_0
    heldout_after: float  # the same with the refitted W


def keep_mask(inter: int, shared: torch.Tensor, experts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """bool [T, I]: the shared neurons [S] plus the neurons of each token's selected experts (experts [E, m], idx [T, A])."""
    T = idx.shape[0]
    keep = torch.zeros(T, inter, dtype=torch.bool, device=idx.device)
    if shared.numel():
        keep[:, shared.to(idx.device)] = True
    cols = experts.to(idx.device)[idx].reshape(T, -1)  # [T, A * m]
    return keep.scatter_(1, cols, True)


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, lam: float) -> torch.Tensor:
    """W = W_0 + (Y - H W_0^T)^T H (H^T H + lam' I)^{-1}, given gram = H^T H [I, I], cross = (Y - H W_0^T)^T H [d, I].

    The ridge is added to gram's diagonal in place and the diagonal restored exactly afterwards:
    besides gram, only the Cholesky factor [I, I] exists (a clone plus an LU copy would make two more,
    which dominate a streamed carve's peak memory at large I).
    """
    diag = gram.diagonal()
    saved = diag.clone()
    diag.add_(lam * float(saved.mean().clamp_min(1e-12)))
    try:
        factor, info = torch.linalg.cholesky_ex(gram)  # gram + lam' I is positive definite
        if int(info) == 0:
            return w0 + torch.cholesky_solve(cross.t(), factor).t()
        del factor  # numerically indefinite: fall back to a pivoted LU solve
        return w0 + torch.linalg.solve(gram, cross.t()).t()
    finally:
        diag.copy_(saved)


def _rel_err(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    return float(((h @ w.t() - y) ** 2).sum() / (y**2).sum().clamp_min(1e-30))


@torch.no_grad()
def refit_down(h: torch.Tensor, keep: torch.Tensor, down: torch.Tensor, holdout: float = 0.25) -> Refit:
    """Refit down [d, I] so that (h * keep) [T, I] reproduces the dense output h down^T [T, d]."""
    h = h.float()
    w0 = down.float()
    hk = h * keep
    y = h @ w0.t()  # [T, d]
    T = h.shape[0]
    n_fit = int(T * (1 - holdout)) if holdout > 0 else T
    n_fit = max(1, min(n_fit, T))
    best = RIDGE_GRID[-1]
    before = after = float("nan")
    if n_fit < T:
        a, b = slice(0, n_fit), slice(n_fit, T)
        gram = hk[a].t() @ hk[a]
        cross = (y[a] - hk[a] @ w0.t()).t() @ hk[a]
        before = _rel_err(hk[b], w0, y[b])
        errs = {lam: _rel_err(hk[b], _solve(gram, cross, w0, lam), y[b]) for lam in RIDGE_GRID}
        best = min(errs, key=errs.get)
        after = errs[best]
        if after >= before:  # never make the held-out error worse than hard zeroing
            return Refit(down=w0, ridge=float("inf"), heldout_before=before, heldout_after=before)
    gram = cross = None  # free the fit-part matrices before the full ones are built
    gram = hk.t() @ hk
    cross = (y - hk @ w0.t()).t() @ hk
    return Refit(down=_solve(gram, cross, w0, best), ridge=best, heldout_before=before, heldout_after=after)
