"""One carved MoE layer as plain tensors, and its routing as a pure function.

The kernels take a `MoETensors` instead of a module so they stay free of nn.Module and
transformers. The tensors are the layer's own parameters (views, never copies), so a kernel always
sees the current weights.

Shapes: T tokens, d hidden, E routed experts, m neurons per expert, n = N_s * m shared neurons,
A experts per token. Gated MLPs stack gate rows then up rows ([.., 2m, d]); plain MLPs keep [.., m, d].

Routers: "analytic" and "linear" are implemented here (and fused in the Triton decode kernel);
any other router ("shadow", "fitted") is passed as `router_fn`, the module's own router, which
`route` then calls (kernels.cpu scores "shadow" with the C kernel instead): the expert computation
is the same whatever chose the experts. This module imports no kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class MoETensors:
    in_proj: torch.Tensor  # [E, 2m, d] (gated) or [E, m, d]
    out_proj: torch.Tensor  # [E, d, m]
    act: Callable[[torch.Tensor], torch.Tensor]  # the activation as a tensor function
    act_name: str  # its transformers ACT2FN name (what the Triton kernels switch on)
    gated: bool
    top_k: int  # A
    router: str  # "analytic" | "linear" | another name, routed by router_fn
    router_gate: torch.Tensor | None  # [E, d] analytic representative gate rows, or the linear gate
    router_up: torch.Tensor | None  # [E, d] analytic representative up rows (gated MLPs)
    router_scale: torch.Tensor  # [E]
    router_bias: torch.Tensor  # [E] float32 load-balancing bias
    norm_topk_prob: bool = False
    in_bias: torch.Tensor | None = None  # [E, 2m]
    shared_in: torch.Tensor | None = None  # [2n, d]
    shared_out: torch.Tensor | None = None  # [d, n]
    shared_in_bias: torch.Tensor | None = None  # [2n]
    out_bias: torch.Tensor | None = None  # [d]
    router_packed: torch.Tensor | None = None  # [2E, d] float32 gate rows then up rows (optional cache)
    # routers not implemented here: x [T, d] -> (weights [T, A] x.dtype, idx [T, A] int64)
    router_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # the shadow router (modules.moe.ShadowRouter): packed codes uint8 [E, rows, d/2] or int8
    # [E, rows, d], row scales float32 [E, rows], the rows' biases [E, rows] or None
    shadow_codes: torch.Tensor | None = None
    shadow_scale: torch.Tensor | None = None
    shadow_bias: torch.Tensor | None = None
    shadow_threshold: torch.Tensor | None = None  # "threshold" selection: scalar float32; None: top-A
    native: bool | None = None  # cache of kernels.cpu.native_ok (whether the C kernels run this layer)

    @property
    def n_routed(self) -> int:
        return self.in_proj.shape[0]

    @property
    def expert_size(self) -> int:
        return self.out_proj.shape[-1]


def router_logits(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """Router scores [T, E] float32 for x [T, d], rounded where the reference module rounds.

    The projections run in float32 and are rounded back to x.dtype: on CPU a bf16 GEMV of a
    [E, d] matrix costs ~20 us of oneDNN set-up, a float32 one ~4 us, and both round the same
    fp32 accumulator. One call over the stacked [2E, d] rows (t.router_packed when the caller
    keeps it, else stacked here: 2E*d elements, negligible next to one expert).
    """
    dt = x.dtype
    if t.router == "linear":
        return F.linear(x.float(), t.router_gate.float()).to(dt).float()
    if t.router_up is None:
        s = t.act(F.linear(x.float(), t.router_gate.float()).to(dt))
    else:
        w = t.router_packed if t.router_packed is not None else torch.cat([t.router_gate, t.router_up]).float()
        gu = F.linear(x.float(), w).to(dt)  # [T, 2E]
        E = t.router_gate.shape[0]
        s = t.act(gu[:, :E]) * gu[:, E:]
    return s.abs().float()


def selection_threshold(t: MoETensors) -> float | None:
    """The shadow router's selection threshold, or None for top-A."""
    return None if t.shadow_threshold is None else float(t.shadow_threshold)


def route(x: torch.Tensor, t: MoETensors) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (combine weights [T, A] in x.dtype, expert indices [T, A] int64).

    Same maths as the module's routers: softmax in float32, top-A of probs + bias, analytic
    weight 1 + p * scale, linear weight p (renormalised over the top-A if asked) * (1 + scale).
    Other routers (the shadow and probe routers): t.router_fn(x), the module's own (kernels.cpu
    scores the shadow router in C instead where it can).
    """
    if t.router_fn is not None:
        return t.router_fn(x)
    probs = router_logits(x, t).softmax(dim=-1)  # [T, E]
    idx = torch.topk(probs + t.router_bias, t.top_k, dim=-1).indices  # [T, A]
    p = probs.gather(1, idx)
    scale = t.router_scale.float()[idx]
    if t.router == "analytic":
        w = 1.0 + p * scale
    else:
        if t.norm_topk_prob:
            p = p / p.sum(dim=-1, keepdim=True)
        w = p * (1.0 + scale)
    return w.to(x.dtype), idx
