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

# lam relative to G's mean diagonal; each lam costs a factorisation, a solve and a held-out product.
# One value: SmolLM2, Gemma 3 and the reference model picked 0.1-3 in every layer of a 1e-3 ... 10 grid,
# with the tail 3 in 24 of SmolLM2's 30 layers (25% active), and lam = 3 alone carves as well as the grid
# 0.1 / 0.3 / 1 / 3 (test perplexity, grid -> 3: SmolLM2 12.5 / 25 / 50% 20.33 / 19.31 / 18.50 -> 20.39 /
# 19.30 / 18.50, Gemma 3 25% 71.53 -> 71.52) in 10-20% less carve time. The held-out tokens still veto a
# refit that does not lower their error.
RIDGE_GRID = (3.0,)
CHUNK = 256  # tokens per step (at least): bounds the [chunk, I] temporaries
CHUNK_FLOATS = 1 << 22  # ... at 16 MiB each: larger chunks where I is small (fewer, larger GEMMs)


def chunk_tokens(inter: int) -> int:
    """Tokens per accumulation step for an intermediate size I: CHUNK_FLOATS / I, at least CHUNK."""
    return max(CHUNK, CHUNK_FLOATS // max(inter, 1))


@dataclass
class Refit:
    down: torch.Tensor  # [d, I] the refitted down projection (float32)
    ridge: float  # the chosen lam, relative to the mean diagonal of H_k^T H_k
    heldout_before: float  # relative squared error on held-out tokens with W_0
    heldout_after: float  # the same with the refitted W (and bias)
    bias: torch.Tensor | None = None  # [d] the output bias fitted with W (intercept=True), float32

    @staticmethod
    def vetoed(w0: torch.Tensor, before: float) -> "Refit":
        """No refit: W_0 kept (ridge inf), the held-out error as it was."""
        return Refit(down=w0, ridge=float("inf"), heldout_before=before, heldout_after=before)


def keep_mask(
    inter: int, shared: torch.Tensor, experts: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [T, I]: the shared neurons [S] plus the neurons of each token's selected experts
    (experts [E, m], idx [T, A]); with kept [T, A] (threshold selection) only the slots it marks."""
    T = idx.shape[0]
    keep = torch.zeros(T, inter, dtype=torch.bool, device=idx.device)
    if shared.numel():
        keep[:, shared.to(idx.device)] = True
    cols = experts.to(idx.device)[idx].reshape(T, -1)  # [T, A * m]
    if kept is None:
        return keep.scatter_(1, cols, True)
    # a token's A slots name distinct experts, so no column is written twice
    src = kept.to(idx.device).unsqueeze(-1).expand(*idx.shape, experts.shape[1]).reshape(T, -1)
    return keep.scatter_(1, cols, src)


@dataclass
class Selection:
    """Which neurons each calibration token keeps: the shared ones [S] plus its experts' (experts
    [E, m], idx [T, A]; with threshold selection only the slots [T, A] it marks)."""

    shared: torch.Tensor
    experts: torch.Tensor
    idx: torch.Tensor
    slots: torch.Tensor | None = None
    tail: torch.Tensor | None = None  # [T, d] float32: the tail's output (carving.tail), which the kept neurons need not make

    def keep(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """bool [t, I]: the keep mask of the tokens `rows` of h [T, I]."""
        slots = None if self.slots is None else self.slots[rows].to(h.device)
        return keep_mask(h.shape[1], self.shared, self.experts, self.idx[rows].to(h.device), slots)

    def kept(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """H_k = h * keep [t, I] float32 for the tokens `rows`."""
        return h[rows].float() * self.keep(h, rows)

    def split(self, h: torch.Tensor, rows: slice, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_k [t, I], R [t, d]) for the tokens `rows`: the kept activations and R = (h * ~keep) W_0^T,
        the part of the dense output Y = H_k W_0^T + R that hard zeroing loses (less the tail's output, with
        a tail). One [t, I] buffer serves both."""
        hc = h[rows].float()
        keep = self.keep(h, rows)
        buf = hc.masked_fill(keep, 0.0)  # h * ~keep
        res = buf @ w0.t()
        if self.tail is not None:  # the tail adds back part of what is dropped
            res -= self.tail[rows].to(res)
        return torch.mul(hc, keep, out=buf), res


def add_gram_(gram: torch.Tensor, hk: torch.Tensor) -> None:
    """gram [I, I] += hk^T hk for hk [t, I]: the diagonal blocks and one off-diagonal block of the
    halves of I, mirrored (three quarters of the multiply-adds of one addmm; a fifth of the time)."""
    c = hk.shape[1] // 2
    a, b = hk[:, :c], hk[:, c:]
    gram[:c, :c].addmm_(a.t(), a)
    gram[c:, c:].addmm_(b.t(), b)
    cross = a.t() @ b  # [c, I - c]
    gram[:c, c:] += cross
    gram[c:, :c] += cross.t()


def _ridge_unit(gram: torch.Tensor) -> float:
    """The scale lam is relative to: the mean diagonal of G."""
    return float(gram.diagonal().mean().clamp_min(1e-12))


def _chunks(start: int, stop: int, size: int = CHUNK) -> list[slice]:
    """[start, stop) in slices of `size` tokens."""
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]


def _accumulate(h, sel: Selection, w0, rows: list[slice], gram, cross, sums: list | None = None) -> None:
    """gram += H_k^T H_k and cross += R^T H_k over the token chunks `rows`; with `sums`
    ([sum of H_k rows [I], sum of R rows [d], count]) those too."""
    for r in rows:
        hk, res = sel.split(h, r, w0)
        add_gram_(gram, hk)
        cross.addmm_(res.t(), hk)
        if sums is not None:
            _add_sums(sums, hk, res)


def _add_sums(sums: list, hk: torch.Tensor, res: torch.Tensor) -> None:
    sums[0] += hk.sum(dim=0)
    sums[1] += res.sum(dim=0)
    sums[2] += hk.shape[0]


def _center(gram: torch.Tensor, cross: torch.Tensor, sums: list, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: G -= n mu_h mu_h^T and C -= n mu_r mu_h^T (sign -1; +1 undoes it). Returns (mu_h, mu_r)."""
    n = max(sums[2], 1)
    mu_h, mu_r = sums[0] / n, sums[1] / n
    gram.addr_(mu_h, mu_h, alpha=sign * n)
    cross.addr_(mu_r, mu_h, alpha=sign * n)
    return mu_h, mu_r


@torch.no_grad()
def refit_down(
    h: torch.Tensor, selection: Selection, down: torch.Tensor, holdout: float = 0.25, intercept: bool = False
) -> Refit:
    """Refit down [d, I] so that (h * keep) [T, I] reproduces the dense output h down^T [T, d].

    The first (1 - holdout) of the tokens fit W for each lam of RIDGE_GRID; the rest pick lam (and
    veto the refit if it does not beat W_0 on them); then W is refitted on all tokens.

    intercept: also fit an output bias b [d] (unpenalised): the part of the dropped neurons' output
    that is the same for every token, which no combination of the kept activations reproduces.
    W and b solve the ridge problem on centred activations (G and C minus their mean outer
    products), b = mean(R) - D mean(H_k); "b alone" (D = 0) is one more candidate.

    Each lam costs one in-place factorisation, one solve for D = W - W_0 [d, I] with d right-hand
    sides and one product with the held-out activations (kept for the whole search, [T_held, I]):
    (G + lam I) D^T = C^T, held-out error ||H_k D^T + b - R||^2 / ||Y||^2. (Solving for the held-out
    activations instead, T_held right-hand sides per lam, made the refit most of a carve's time;
    it is still what runs when there are fewer held-out tokens than d.)
    """
    w0 = down.float()
    d, inter = w0.shape
    T = h.shape[0]
    size = chunk_tokens(inter)
    n_fit = max(1, min(int(T * (1 - holdout)) if holdout > 0 else T, T))
    gram = torch.zeros(inter, inter, dtype=torch.float32, device=h.device)  # G = H_k^T H_k
    cross = torch.zeros(d, inter, dtype=torch.float32, device=h.device)  # C = R^T H_k
    zeros = (torch.zeros(inter, device=h.device), torch.zeros(d, device=h.device))
    sums = [zeros[0].clone(), zeros[1].clone(), 0] if intercept else None
    _accumulate(h, selection, w0, _chunks(0, n_fit, size), gram, cross, sums)
    best, before, after = RIDGE_GRID[-1], float("nan"), float("nan")
    if n_fit < T:
        held = [selection.split(h, r, w0) for r in _chunks(n_fit, T, size)]  # (H_k [t, I], R [t, d]) per chunk
        y2 = max(sum(float(torch.addmm(rc, hk, w0.t()).pow(2).sum()) for hk, rc in held), 1e-30)  # ||Y||^2, Y = H_k W_0^T + R
        before = sum(float(rc.pow(2).sum()) for _, rc in held) / y2
        mu_h, mu_r = _center(gram, cross, sums, -1.0) if intercept else zeros
        system = InPlaceCholesky(gram)
        unit = _ridge_unit(gram)
        n_held = T - n_fit
        # per lam, solve with whichever right-hand sides are fewer: D^T [I, d] (then one product with the
        # held-out activations) or the held-out activations themselves [I, T_held] (a few calibration tokens)
        # column-major [I, d] (cross's own layout, transposed): the solves work on it in place
        delta = torch.empty(d, inter, dtype=torch.float32, device=h.device).t() if n_held > d else None
        errs = {}
        if intercept:  # b alone: D = 0, b = mean(R)
            errs[float("inf")] = sum(float((rc - mu_r).pow(2).sum()) for _, rc in held) / y2
        for lam in RIDGE_GRID:
            if not system.factor(lam * unit):
                continue  # not positive definite in float32 at this lam: skip it
            err = 0.0
            if delta is not None:
                system.solve_(delta.copy_(cross.t()))  # D^T = (G + lam I)^{-1} C^T
                b = mu_r - delta.t() @ mu_h
                for hk, rc in held:  # H_k W^T + b - Y = H_k D^T - (R - b)
                    err += float(torch.addmm(rc - b, hk, delta, beta=-1.0).pow(2).sum())
            else:
                q = system.solve_(mu_h.clone().unsqueeze(1)).squeeze(1)  # (G + lam I)^{-1} mu_h
                b = mu_r - cross @ q
                for hk, rc in held:  # the same, as (H_k (G + lam I)^{-1}) C^T - (R - b)
                    p = hk.clone()
                    system.solve_(p.t())
                    err += float(torch.addmm(rc - b, p, cross.t(), beta=-1.0).pow(2).sum())
            errs[lam] = err / y2
        system.restore()
        del system, delta
        if not errs or min(errs.values()) >= before:  # never make the held-out error worse than hard zeroing
            return Refit.vetoed(w0, before)
        best = min(errs, key=errs.get)
        after = errs[best]
        if intercept:
            _center(gram, cross, sums, 1.0)  # back to the raw sums, to which the held-out tokens add
        for hk, rc in held:  # G and C of all tokens
            add_gram_(gram, hk)
            cross.addmm_(rc.t(), hk)
            if intercept:
                _add_sums(sums, hk, rc)
        del held
    mu_h, mu_r = _center(gram, cross, sums, -1.0) if intercept else zeros
    if best == float("inf"):  # the bias alone
        return Refit(down=w0, ridge=best, heldout_before=before, heldout_after=after, bias=mu_r.clone())
    system = InPlaceCholesky(gram)
    if not system.factor(best * _ridge_unit(gram)):
        return Refit.vetoed(w0, before)
    system.solve_(cross.t())  # C^T <- (G + lam I)^{-1} C^T: cross now holds W - W_0
    del system, gram
    bias = mu_r - cross @ mu_h if intercept else None
    return Refit(down=cross.add_(w0), ridge=best, heldout_before=before, heldout_after=after, bias=bias)
