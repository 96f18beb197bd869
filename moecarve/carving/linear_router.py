"""A linear (softmax-over-a-linear-gate) router fitted on calibration tokens (tensors in, tensors out).

Standard MoE architectures (Qwen2-MoE, Mixtral, ...) route by softmax(x W^T), which cannot express
CMoE's analytic score |(up_r . x) * act(gate_r . x)|. This module fits W so that the carved layer
stays close to the dense FFN, in two steps:

1. Least squares: W0 = argmin ||x W^T - s(x)||^2 (+ ridge), s centred per token (softmax ignores a
   per-token shift), for two score targets: CMoE's analytic scores and the log of each expert's
   activation mass sum_{j in e} |h_j(x)| (the oracle of README's "oracle routing"; on the reference
   model it fits ~3% better than the analytic scores). Each at its best global temperature on a
   grid; the target with the lower routing error wins.
2. Router-only optimisation of ||MoE(x) - FFN(x)||^2 with Adam. The forward pass is the exact hard
   top-A routing; gradients reach unselected experts through a straight-through term (their dense
   softmax weight, whose value is subtracted out). The best W seen (including W0) is kept, judged
   on the whole fitting set, so the fit never ends worse than its initialisation.

Combine weights: the linear router renormalises the top-A probabilities (norm_topk_prob) and scales
them by A (router `scale` = A - 1), so the A selected experts' weights sum to A; with equal logits
every selected expert weighs exactly 1, as in CMoE. Exporters fold that constant into `down_proj`.

Because the routed experts partition the non-shared neurons, the dense FFN output minus the shared
part is the sum of all routed expert outputs Y_e(x), so
    MoE(x) - FFN(x) = sum_e (G_e(x) - 1) Y_e(x)
with G_e the combine weight (0 for unselected experts). Y [T, E, d] is computed once on a token
subsample capped in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules.moe import MoESpec
from .ffn import DenseFFN
from .grouping import Grouping
from .router import analytic_router

MAX_FIT_ELEMENTS = 2**27  # cap on T * E * d floats of the expert outputs kept for fitting (512 MiB)
MAX_FIT_TOKENS = 8192
STEPS = 300
BATCH = 512
EVAL_EVERY = 25
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def analytic_scores(ffn: DenseFFN, grouping: Grouping, x: torch.Tensor) -> torch.Tensor:
    """CMoE's routing scores |(up_r . x) * act(gate_r . x)| for x [T, d] -> [T, E] float32."""
    r = analytic_router(ffn, grouping.representatives)
    s = ffn.act_fn(F.linear(x, r["gate"].to(x)))
    if r["up"] is not None:
        s = s * F.linear(x, r["up"].to(x))
    return s.abs().float()


def expert_outputs(ffn: DenseFFN, grouping: Grouping, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each routed expert's output (weight 1, no output bias) for x [T, d] -> Y [T, E, d] float32."""
    groups = grouping.experts.to(x.device)  # [E, m]
    down = ffn.down.float()[:, groups]  # [d, E, m]
    out = []
    for s in range(0, x.shape[0], chunk):
        h = ffn.hidden(x[s : s + chunk].to(ffn.up.dtype)).float()[:, groups]  # [t, E, m]
        out.append(torch.einsum("tem,dem->ted", h, down))
    return torch.cat(out)


def combine_weights(logits: torch.Tensor, top_k: int, straight_through: bool = False) -> torch.Tensor:
    """Dense combine weights G [T, E] of the linear router for logits [T, E]: top-A renormalised
    softmax probabilities times A, 0 elsewhere. With straight_through the value is unchanged but
    unselected experts get the gradient of their dense weight A * softmax."""
    probs = logits.float().softmax(dim=-1)
    idx = torch.topk(probs, top_k, dim=-1).indices
    sel = probs.gather(1, idx)
    w = torch.zeros_like(probs).scatter(1, idx, top_k * sel / sel.sum(dim=-1, keepdim=True))
    if straight_through:
        off = torch.ones_like(probs).scatter(1, idx, 0.0)
        soft = top_k * probs
        w = w + off * (soft - soft.detach())
    return w


@torch.no_grad()
def routing_error(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, top_k: int, chunk: int = 4096) -> float:
    """Mean over tokens of ||MoE(x) - FFN(x)||^2 for router weight [E, d], x [T, d], Y [T, E, d]."""
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        g = combine_weights(F.linear(x[s : s + chunk], weight), top_k)
        diff = torch.einsum("te,ted->td", g - 1.0, y[s : s + chunk])
        total += float(diff.pow(2).sum())
    return total / x.shape[0]


def least_squares_init(x: torch.Tensor, scores: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W [E, d] minimising ||x W^T - (scores - per-token mean)||^2 + lam ||W||^2, lam = ridge * mean diag(x^T x)."""
    target = scores - scores.mean(dim=-1, keepdim=True)
    gram = x.T @ x  # [d, d]
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, x.T @ target).T.contiguous()  # [E, d]


def fit_linear_router(
    ffn: DenseFFN,
    grouping: Grouping,
    x: torch.Tensor,
    spec: MoESpec,
    *,
    steps: int = STEPS,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fit a LinearRouter on the calibration FFN inputs x [T, d].

    Returns {"weight": [E, d] float32, "scale": [E] float32 (A - 1)}. Needs spec.norm_topk_prob: the
    fitted weights assume the top-A probabilities are renormalised.
    """
    if not spec.norm_topk_prob:  # the combine weights below assume it (see module docstring)
        raise ValueError("the linear router is fitted for norm_topk_prob=True (methods.moe_spec sets it)")
    E, A = spec.n_routed, spec.top_k
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cap = max(1, min(MAX_FIT_TOKENS, MAX_FIT_ELEMENTS // (E * ffn.hidden_size)))
    if x.shape[0] > cap:
        x = x[torch.randperm(x.shape[0], generator=gen)[:cap].to(x.device)]
    xf = x.float()
    y = expert_outputs(ffn, grouping, x)  # [T, E, d]

    best = _initial_weight(ffn, grouping, xf, y, A)
    if A < E and steps > 0:  # with A == E every expert is always selected: nothing to route
        best, _ = _optimise(best, routing_error(best, xf, y, A), xf, y, A, steps, gen)
    return {"weight": best.detach(), "scale": torch.full((E,), float(A - 1))}


def expert_mass(ffn: DenseFFN, grouping: Grouping, x: torch.Tensor) -> torch.Tensor:
    """log sum_{j in e} |h_j(x)| for x [T, d] -> [T, E] float32: how much each expert would contribute."""
    h = ffn.hidden(x.to(ffn.up.dtype)).float().abs()[:, grouping.experts.to(x.device)]  # [T, E, m]
    return h.sum(dim=-1).clamp_min(1e-6).log()


def _initial_weight(ffn: DenseFFN, grouping: Grouping, x: torch.Tensor, y: torch.Tensor, top_k: int) -> torch.Tensor:
    """The least-squares fit (analytic scores or log expert mass, at the best grid temperature)
    with the lowest routing error."""
    best, best_err = None, float("inf")
    for scores in (analytic_scores(ffn, grouping, x), expert_mass(ffn, grouping, x)):
        w0 = least_squares_init(x, scores)
        for t in TEMPERATURES:
            err = routing_error(w0 * t, x, y, top_k)
            if err < best_err:
                best, best_err = w0 * t, err
    return best


@torch.enable_grad()  # carve_ffn runs under no_grad
def _optimise(w0: torch.Tensor, err0: float, x: torch.Tensor, y: torch.Tensor, top_k: int, steps: int,
              gen: torch.Generator) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Adam on the straight-through routing error; returns the best (weight, error) seen."""
    weight = w0.clone().requires_grad_(True)
    lr = 0.05 * float(w0.abs().mean().clamp_min(1e-8))  # step sizes relative to the weights' scale
    opt = torch.optim.Adam([weight], lr=lr)
    best, best_err = w0.clone(), err0
    T = x.shape[0]
    for step in range(1, steps + 1):
        rows = torch.randint(0, T, (min(BATCH, T),), generator=gen).to(x.device)
        g = combine_weights(F.linear(x[rows], weight), top_k, straight_through=True)
        diff = torch.einsum("te,ted->td", g - 1.0, y[rows])
        loss = diff.pow(2).sum(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                err = routing_error(weight.detach(), x, y, top_k)
            if err < best_err:
                best, best_err = weight.detach().clone(), err
    return best, best_err
