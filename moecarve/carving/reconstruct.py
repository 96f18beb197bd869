"""Least-squares refit of down_proj on the routed activations (tensors in, tensors out).

After carving, a token's output is down(h * keep) with keep the shared neurons plus its selected
experts' neurons. Hard zeroing of the rest biases the output; we refit the down projection so
that the carved output best matches the dense FFN output on the calibration inputs:

    W = argmin ||H_k W^T - Y||^2 + lam ||W - W_0||^2,   H_k = h * keep [T, I],  Y = h W_0^T [T, d]

(ridge towards the original weights, so neurons the calibration rarely selects keep theirs). The
inputs x are the carved model's own (layers are carved in order), as in GPTQ; lam is picked by
the relative error on held-out calibration tokens.

Written for a streamed carve's peak memory: H_k, Y and the keep mask exist only a token chunk at a
time; the one [I, I] matrix, G = H_k^T H_k, is factored in place (cholesky.InPlaceCholesky) for
every lam, and the final solve overwrites the cross term. Besides h [T, I] and down [d, I], the
refit holds G [I, I], C [d, I] and chunk-sized temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cholesky import InPlaceCholesky

RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
CHUNK = 256  # tokens per step: bounds the [chunk, I] temporaries


@dataclass
class Refit:
    down: torch.Tensor  # [d, I] the refitted down projection (float32)
    ridge: float  # the chosen lam, relative to the mean diagonal of H_k^T H_k
    heldout_before: float  # relative squared error on held-out tokens with W_0
    heldout_after: float  # the same with the refitted W

    @staticmethod
    def vetoed(w0: torch.Tensor, before: float) -> "Refit":
        """No refit: W_0 kept (ridge inf), the held-out error as it was."""
        return Refit(down=w0, ridge=float("inf"), heldout_before=before, heldout_after=before)


def keep_mask(inter: int, shared: torch.Tensor, experts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """bool [T, I]: the shared neurons [S] plus the neurons of each token's selected experts (experts [E, m], idx [T, A])."""
    T = idx.shape[0]
    keep = torch.zeros(T, inter, dtype=torch.bool, device=idx.device)
    if shared.numel():
        keep[:, shared.to(idx.device)] = True
    cols = experts.to(idx.device)[idx].reshape(T, -1)  # [T, A * m]
    return keep.scatter_(1, cols, True)


@dataclass
class Selection:
    """Which neurons each calibration token keeps: the shared ones [S] plus its experts' (experts [E, m], idx [T, A])."""

    shared: torch.Tensor
    experts: torch.Tensor
    idx: torch.Tensor

    def keep(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """bool [t, I]: the keep mask of the tokens `rows` of h [T, I]."""
        return keep_mask(h.shape[1], self.shared, self.experts, self.idx[rows].to(h.device))

    def kept(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """H_k = h * keep [t, I] float32 for the tokens `rows`."""
        return h[rows].float() * self.keep(h, rows)

    def split(self, h: torch.Tensor, rows: slice, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_k [t, I], R [t, d]) for the tokens `rows`: the kept activations and R = (h * ~keep) W_0^T,
        the part of the dense output Y = H_k W_0^T + R that hard zeroing loses. One [t, I] buffer serves both."""
        hc = h[rows].float()
        keep = self.keep(h, rows)
        buf = hc.masked_fill(keep, 0.0)  # h * ~keep
        res = buf @ w0.t()
        return torch.mul(hc, keep, out=buf), res


def _ridge_unit(gram: torch.Tensor) -> float:
    """The scale lam is relative to: the mean diagonal of G."""
    return float(gram.diagonal().mean().clamp_min(1e-12))


def _chunks(start: int, stop: int, size: int = CHUNK) -> list[slice]:
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]


def _accumulate(h, sel: Selection, w0, rows: list[slice], gram, cross) -> None:
    """gram += H_k^T H_k and cross += R^T H_k over the token chunks `rows`."""
    for r in rows:
        hk, res = sel.split(h, r, w0)
        gram.addmm_(hk.t(), hk)
        cross.addmm_(res.t(), hk)


@torch.no_grad()
def refit_down(h: torch.Tensor, selection: Selection, down: torch.Tensor, holdout: float = 0.25) -> Refit:
    """Refit down [d, I] so that (h * keep) [T, I] reproduces the dense output h down^T [T, d].

    The first (1 - holdout) of the tokens fit W for each lam of RIDGE_GRID; the rest pick lam (and
    veto the refit if it does not beat W_0 on them); then W is refitted on all tokens.
    """
    w0 = down.float()
    d, inter = w0.shape
    T = h.shape[0]
    n_fit = max(1, min(int(T * (1 - holdout)) if holdout > 0 else T, T))
    gram = torch.zeros(inter, inter, dtype=torch.float32, device=h.device)  # G = H_k^T H_k
    cross = torch.zeros(d, inter, dtype=torch.float32, device=h.device)  # C = R^T H_k
    _accumulate(h, selection, w0, _chunks(0, n_fit), gram, cross)
    best, before, after = RIDGE_GRID[-1], float("nan"), float("nan")
    if n_fit < T:
        held = _chunks(n_fit, T)
        res, y2 = [], 0.0  # R [t, d] of each held-out chunk; ||Y||^2 over them
        for r in held:
            hk, rc = selection.split(h, r, w0)
            res.append(rc)
            y2 += float(torch.addmm(rc, hk, w0.t()).pow(2).sum())  # Y = H_k W_0^T + R
        del hk, rc
        y2 = max(y2, 1e-30)
        before = sum(float(rc.pow(2).sum()) for rc in res) / y2
        system = InPlaceCholesky(gram)
        unit = _ridge_unit(gram)
        errs = {}
        for lam in RIDGE_GRID:
            if not system.factor(lam * unit):
                continue  # not positive definite in float32 at this lam: skip it
            err = 0.0
            for r, rc in zip(held, res):  # H_k W^T - Y = H_k (G + lam I)^{-1} C^T - R
                p = selection.kept(h, r)  # [t, I]
                system.solve_(p.t())  # p <- H_k (G + lam I)^{-1}
                err += float((p @ cross.t() - rc).pow(2).sum())
            errs[lam] = err / y2
        system.restore()
        del system, res
        if not errs or min(errs.values()) >= before:  # never make the held-out error worse than hard zeroing
            return Refit.vetoed(w0, before)
        best = min(errs, key=errs.get)
        after = errs[best]
        _accumulate(h, selection, w0, held, gram, cross)  # G and C of all tokens
    system = InPlaceCholesky(gram)
    if not system.factor(best * _ridge_unit(gram)):
        return Refit.vetoed(w0, before)
    system.solve_(cross.t())  # C^T <- (G + lam I)^{-1} C^T: cross now holds W - W_0
    del system, gram
    return Refit(down=cross.add_(w0), ridge=best, heldout_before=before, heldout_after=after)
