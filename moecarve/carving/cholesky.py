"""Cholesky solves that overwrite half of a symmetric matrix and then give it back (tensors only).

The down_proj refit (reconstruct.py) solves (G + lam I) X = B for several ridge strengths lam with
one Gram matrix G [n, n]. `torch.linalg.cholesky` allocates its factor beside G, a second [n, n]
matrix per solve: at n = 11008 (a 7B FFN) that is 0.5 GB, the largest tensor of a streamed carve.
Here the factor overwrites G's lower triangle instead (a blocked right-looking Cholesky on block
columns); G's strict upper triangle is never written and its diagonal blocks are kept aside
([n, block] floats in all), so `restore` rebuilds G exactly for the next lam.

    system = InPlaceCholesky(gram)      # gram [n, n] symmetric, owned by the system from now on
    if system.factor(shift=lam):        # lower triangle <- chol(G + lam I)
        system.solve_(b)                # b [n, r] <- (G + lam I)^{-1} b, in place
    system.restore()                    # gram is G again, bit for bit
"""

from __future__ import annotations

import torch


# One block up to WHOLE: each block is a handful of torch calls, and many small calls are what made
# a factorisation slow (1536 x 1536 in blocks of 256: 7x the time of one block on a busy 2-core
# machine). Larger matrices keep the saved diagonal blocks (n * block floats) at BLOCK_FLOATS, 4 MiB,
# so that the factorisation stays in G's own memory (a streamed carve's peak).
WHOLE = 2048
BLOCK_FLOATS = 1 << 20
# Rows of the panel L21 = A21 L11^{-T} solved per call: solve_triangular returns a new tensor (and may copy
# its strided input), which for the whole panel was [n - b, b] floats, twice, beside G.
PANEL_ROWS = 256


def default_block(n: int) -> int:
    """The block width for an n x n matrix: the whole matrix up to n = WHOLE, else BLOCK_FLOATS / n (at least 256)."""
    return n if n <= WHOLE else max(256, BLOCK_FLOATS // n)


class InPlaceCholesky:
    """Factor G + shift I into G's own lower triangle, solve with it, and restore G afterwards."""

    def __init__(self, gram: torch.Tensor, block: int | None = None):
        n = gram.shape[0]
        if gram.dim() != 2 or gram.shape[1] != n:
            raise ValueError(f"expected a square matrix, got shape {tuple(gram.shape)}")
        block = default_block(n) if block is None else block
        self.a = gram
        self.n = n
        self.bounds = [(j, min(j + block, n)) for j in range(0, n, block)]
        # The diagonal blocks are the only entries both triangles share: keep them aside.
        self.diag = [gram[j0:j1, j0:j1].clone() for j0, j1 in self.bounds]  # n * block floats
        self.factored = True  # so that restore() below mirrors the upper triangle into the lower one
        self.restore()  # from now on every factorisation reads the same (exactly symmetric) G

    def restore(self) -> None:
        """G again in both triangles: the diagonal blocks from their copies, the lower from the upper."""
        if not self.factored:
            return
        a = self.a
        for (j0, j1), d in zip(self.bounds, self.diag):
            a[j0:j1, j0:j1].copy_(d)
            a[j1:, j0:j1].copy_(a[j0:j1, j1:].mT)
        self.factored = False

    def factor(self, shift: float = 0.0) -> bool:
        """Lower triangle <- L with L L^T = G + shift I. False (and G restored) if that is not positive definite."""
        self.restore()
        a = self.a
        a.diagonal().add_(shift)
        self.factored = True
        for k0, k1 in self.bounds:
            lkk, info = torch.linalg.cholesky_ex(a[k0:k1, k0:k1])  # reads the block's lower triangle
            if int(info) != 0:
                self.restore()
                return False
            a[k0:k1, k0:k1].copy_(lkk)  # upper part of the block <- 0: the block is triangular now
            if k1 == self.n:
                break
            panel = a[k1:, k0:k1]  # [n - k1, b]: L21 = A21 L11^{-T}, each row on its own
            for r0 in range(0, panel.shape[0], PANEL_ROWS):  # in row slices: the solve's copies stay small
                rows = panel[r0 : r0 + PANEL_ROWS]
                rows.copy_(torch.linalg.solve_triangular(lkk.mT, rows, upper=True, left=False))
            for j0, j1 in self.bounds:  # trailing update A22 -= L21 L21^T, block column by block column
                if j0 >= k1:  # rows >= j0 only: the lower triangle (and the saved diagonal block)
                    a[j0:, j0:j1].addmm_(panel[j0 - k1 :], panel[j0 - k1 : j1 - k1].mT, alpha=-1.0)
        return True

    def solve_(self, b: torch.Tensor) -> torch.Tensor:
        """b [n, r] <- (G + shift I)^{-1} b in place (after a successful factor); returns b."""
        if not self.factored:
            raise RuntimeError("factor() the system before solving with it")
        a = self.a
        for k0, k1 in self.bounds:  # forward: L z = b
            if k0:
                b[k0:k1].addmm_(a[k0:k1, :k0], b[:k0], alpha=-1.0)
            b[k0:k1].copy_(torch.linalg.solve_triangular(a[k0:k1, k0:k1], b[k0:k1], upper=False))
        for k0, k1 in reversed(self.bounds):  # backward: L^T x = z
            if k1 < self.n:
                b[k0:k1].addmm_(a[k1:, k0:k1].mT, b[k1:], alpha=-1.0)
            b[k0:k1].copy_(torch.linalg.solve_triangular(a[k0:k1, k0:k1].mT, b[k0:k1], upper=True))
        return b
