"""Expert-load bookkeeping: per-batch expert counts from router hooks, CMoE's bias update.

The routers return (weights [T, A], idx [T, A]); a forward hook on each router counts how many
token slots each routed expert received, without touching the module code.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import carved_layers


class LoadTracker:
    """Counts routed-expert selections per carved layer while enabled.

    Under gradient checkpointing the router may run again in backward (recompute); that doubles
    every count of the batch, which changes neither the load ratios nor the sign-based bias update.
    """

    def __init__(self, model: nn.Module):
        self.routers = {path: moe.router for path, moe in carved_layers(model).items()}
        self.counts = {p: torch.zeros(r.bias.numel(), dtype=torch.float64) for p, r in self.routers.items()}
        self.enabled = True
        self._handles = [r.register_forward_hook(self._hook(p)) for p, r in self.routers.items()]

    def _hook(self, path: str):
        def hook(module, inputs, output):
            if self.enabled:
                idx = output[1].detach().reshape(-1)
                self.counts[path] += torch.bincount(idx, minlength=self.counts[path].numel()).cpu().double()

        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def imbalance(self) -> dict[str, float]:
        """max / mean expert load per layer over the counted tokens."""
        return {p: float(c.max() / c.mean()) if c.sum() > 0 else float("nan") for p, c in self.counts.items()}

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """CMoE's auxiliary-loss-free balancing: overloaded experts (count > mean) bias -= gamma,
        underloaded ones (count < mean) bias += gamma; the counts are those since the last reset."""
        if gamma <= 0:
            return
        for p, r in self.routers.items():
            c = self.counts[p]
            step = torch.sign(c.mean() - c).to(device=r.bias.device, dtype=r.bias.dtype)
            r.bias.add_(gamma * step)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def summarize(imbalance: dict[str, float]) -> tuple[float, float]:
    """(worst layer, mean over layers) of per-layer max/mean loads."""
    vals = [v for v in imbalance.values() if v == v]
    if not vals:
        return float("nan"), float("nan")
    return max(vals), sum(vals) / len(vals)
