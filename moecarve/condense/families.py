"""The one table of per-MoE-family knowledge for condensing.

Where each MoE layer keeps its router, routed experts and shared experts, and how its routing
weights are computed. Nothing else in moecarve.condense names an MoE class. Every family is read
into the same `MoEView` of tensors (views of the module's weights, no copies).

Shapes: d hidden size, E routed experts, m neurons per routed expert, n neurons of the shared
experts (fused), T tokens, A experts per token. Gated in-projections stack gate rows first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..errors import MoecarveError
from ..modules.moe import CarvedMoE


class UnsupportedMoE(MoecarveError, ValueError):
    """The model holds no MoE layer moecarve knows how to condense."""


@dataclass
class MoEView:
    """One MoE layer as tensors: y = g(x) * shared(x) + sum_{e in top-A} w_e expert_e(x) + b."""

    act: str
    gated: bool
    experts_in: torch.Tensor  # [E, 2m, d] (gated) or [E, m, d]
    experts_out: torch.Tensor  # [E, d, m]
    experts_in_bias: torch.Tensor | None = None  # [E, 2m] or [E, m]
    shared_in: torch.Tensor | None = None  # [2n, d] or [n, d]
    shared_out: torch.Tensor | None = None  # [d, n]
    shared_in_bias: torch.Tensor | None = None  # [2n] or [n]
    shared_gate: torch.Tensor | None = None  # [1, d]: shared output scaled by sigmoid(shared_gate . x)
    out_bias: torch.Tensor | None = None  # [d]

    @property
    def n_routed(self) -> int:
        return self.experts_in.shape[0]

    @property
    def n_shared_neurons(self) -> int:
        return 0 if self.shared_out is None else self.shared_out.shape[1]


@dataclass(frozen=True)
class Family:
    """How one MoE layer class is read and routed.

    read(module, config) -> MoEView.
    route(module, x [T, d]) -> (weights [T, A] float32, indices [T, A] int64): what the router picks.
    """

    name: str
    read: Callable[[nn.Module, object], MoEView]
    route: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _read_carved(mod: CarvedMoE, config) -> MoEView:
    s, ex = mod.spec, mod.experts
    sh = mod.shared
    return MoEView(
        act=s.act, gated=s.gated, experts_in=ex.in_proj.detach(), experts_out=ex.out_proj.detach(),
        experts_in_bias=None if ex.in_bias is None else ex.in_bias.detach(),
        shared_in=None if sh is None else sh.in_proj.detach(), shared_out=None if sh is None else sh.out_proj.detach(),
        shared_in_bias=None if sh is None or sh.in_bias is None else sh.in_bias.detach(),
        out_bias=None if mod.out_bias is None else mod.out_bias.detach(),
    )  # fmt: skip


def _route_carved(mod: CarvedMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, idx = mod.router(x)
    return w.float(), idx


def _bias(lin: nn.Linear) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach()


def _stacked_reader(shared: str | None, shared_gate: str | None) -> Callable[[nn.Module, object], MoEView]:
    """transformers' stacked experts (`experts.gate_up_proj` [E, 2m, d], `experts.down_proj` [E, d, m])
    plus an optional gate/up/down shared MLP at attribute `shared` and a sigmoid gate `shared_gate`."""

    def read(mod: nn.Module, config) -> MoEView:
        ex = mod.experts
        view = MoEView(
            act=config.hidden_act, gated=True, experts_in=ex.gate_up_proj.detach(), experts_out=ex.down_proj.detach()
        )
        if shared is not None:
            mlp = getattr(mod, shared)
            view.shared_in = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
            view.shared_out = mlp.down_proj.weight.detach()
            if mlp.gate_proj.bias is not None:
                view.shared_in_bias = torch.cat([_bias(mlp.gate_proj), _bias(mlp.up_proj)])
            view.out_bias = _bias(mlp.down_proj)
        if shared_gate is not None:
            view.shared_gate = getattr(mod, shared_gate).weight.detach()
        return view

    return read


def _route_stacked(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, w, idx = mod.gate(x)  # every transformers top-k router returns (logits, weights, indices)
    return w.float(), idx


_NO_SHARED = Family("transformers MoE without shared experts", _stacked_reader(None, None), _route_stacked)
_DEEPSEEK = Family("DeepSeek-V2/V3", _stacked_reader("shared_experts", None), _route_stacked)

# MoE layer class name -> family
FAMILIES: dict[str, Family] = {
    "CarvedMoE": Family("moecarve carved", _read_carved, _route_carved),
    "Qwen2MoeSparseMoeBlock": Family("Qwen2-MoE", _stacked_reader("shared_expert", "shared_expert_gate"), _route_stacked),
    "DeepseekV2Moe": _DEEPSEEK,
    "DeepseekV3MoE": _DEEPSEEK,
    "MixtralSparseMoeBlock": _NO_SHARED,
    "OlmoeSparseMoeBlock": _NO_SHARED,
    "Qwen3MoeSparseMoeBlock": _NO_SHARED,
}


def family_of(module: nn.Module) -> Family | None:
    return FAMILIES.get(type(module).__name__)


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every condensable MoE module of `model`, by dotted path, in model order."""
    found = {path: m for path, m in model.named_modules() if family_of(m) is not None}
    if not found:
        raise UnsupportedMoE(
            f"{type(model).__name__} has no MoE layer moecarve can condense; supported: {', '.join(sorted(FAMILIES))}"
        )
    return found


# -- computing with a view ---------------------------------------------------------------------


def _mlp(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, act, gated: bool) -> torch.Tensor:
    h = F.linear(x, w_in, b_in)
    if gated:
        g, u = h.chunk(2, dim=-1)
        return act(g) * u
    return act(h)


def shared_output(view: MoEView, x: torch.Tensor) -> torch.Tensor:
    """g(x) * shared(x) + b: [T, d] -> [T, d] (zeros without shared experts or bias)."""
    y = torch.zeros_like(x)
    if view.shared_out is not None:
        h = _mlp(x, view.shared_in, view.shared_in_bias, ACT2FN[view.act], view.gated)
        y = F.linear(h, view.shared_out)
        if view.shared_gate is not None:
            y = y * torch.sigmoid(F.linear(x, view.shared_gate))
    if view.out_bias is not None:
        y = y + view.out_bias
    return y


def expert_output(view: MoEView, e: int, x: torch.Tensor) -> torch.Tensor:
    """expert_e(x) with weight 1: [T, d] -> [T, d]."""
    b = None if view.experts_in_bias is None else view.experts_in_bias[e]
    h = _mlp(x, view.experts_in[e], b, ACT2FN[view.act], view.gated)
    return F.linear(h, view.experts_out[e])
