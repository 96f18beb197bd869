"""The one table of per-MoE-family knowledge for condensing.

Where each MoE layer keeps its router, routed experts and shared experts, how its routing
weights are computed, and whether (and where) its config can make a layer dense, so that a
condensed model saves in its source architecture. Nothing else in moecarve.condense names an MoE
class or config field. Every family is read into the same `MoEView` of tensors (views of the
module's weights, no copies).

Shapes: d hidden size, E routed experts, m neurons per routed expert, n neurons of the shared
experts (fused), T tokens, A experts per token. Gated in-projections stack gate rows first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..errors import MoecarveError
from ..modules.condensed import CondensedMLP, CondensedSpec
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
class DenseLayers:
    """How a family's own config makes chosen decoder layers dense, so that a condensed model can be
    saved in its source architecture (plain transformers, no moecarve code).

    mlp_class: the family's dense MLP class, looked up in the MoE class's Python module; it must have
        gate_proj / up_proj / down_proj nn.Linear of config.intermediate_size neurons, no bias.
    attr: the config attribute that lists or counts the dense layers.
    why_not(config, layers) -> why the config cannot mark exactly these decoder layers dense, or None.
    mark(config, layers): record them as dense in the config (what the model's __init__ reads).
    """

    mlp_class: str
    attr: str
    why_not: Callable[[object, list[int]], str | None]
    mark: Callable[[object, list[int]], None]


@dataclass(frozen=True)
class Family:
    """How one MoE layer class is read and routed, and how its config expresses dense layers.

    read(module, config) -> MoEView.
    route(module, x [T, d]) -> (weights [T, A] float32, indices [T, A] int64): what the router picks.
    dense: None when the config has no way to make a layer dense (condensed models of this family
        are saved in moecarve's format).
    """

    name: str
    read: Callable[[nn.Module, object], MoEView]
    route: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dense: DenseLayers | None = None


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


def _mlp_only_layers(mlp_class: str) -> DenseLayers:
    """Qwen2/3-MoE: any decoder index listed in config.mlp_only_layers is dense."""

    def mark(config, layers: list[int]) -> None:
        config.mlp_only_layers = sorted(set(config.mlp_only_layers or []) | set(layers))

    return DenseLayers(mlp_class, "mlp_only_layers", lambda config, layers: None, mark)


def _first_k_dense(mlp_class: str) -> DenseLayers:
    """DeepSeek-V2/V3: exactly the first config.first_k_dense_replace decoder layers are dense."""

    def why_not(config, layers: list[int]) -> str | None:
        if getattr(config, "mlp_bias", False):
            return "its dense layers have biases (mlp_bias) the condensed layers lack"
        k = config.first_k_dense_replace or 0
        if sorted(layers) != list(range(k, k + len(layers))):
            return (f"only its first first_k_dense_replace layers can be dense (now {k}); "
                    f"the condensed layers {sorted(layers)} are not layers {k}..{k + len(layers) - 1}")  # fmt: skip
        return None

    def mark(config, layers: list[int]) -> None:
        config.first_k_dense_replace = (config.first_k_dense_replace or 0) + len(layers)

    return DenseLayers(mlp_class, "first_k_dense_replace", why_not, mark)


_NO_SHARED = _stacked_reader(None, None)
_DEEPSEEK = _stacked_reader("shared_experts", None)

# MoE layer class name -> family
FAMILIES: dict[str, Family] = {
    "CarvedMoE": Family("moecarve carved", _read_carved, _route_carved),
    "Qwen2MoeSparseMoeBlock": Family("Qwen2-MoE", _stacked_reader("shared_expert", "shared_expert_gate"), _route_stacked,
                                     _mlp_only_layers("Qwen2MoeMLP")),
    "DeepseekV2Moe": Family("DeepSeek-V2", _DEEPSEEK, _route_stacked, _first_k_dense("DeepseekV2MLP")),
    "DeepseekV3MoE": Family("DeepSeek-V3", _DEEPSEEK, _route_stacked, _first_k_dense("DeepseekV3MLP")),
    "MixtralSparseMoeBlock": Family("Mixtral", _NO_SHARED, _route_stacked),
    "OlmoeSparseMoeBlock": Family("OLMoE", _NO_SHARED, _route_stacked),
    "Qwen3MoeSparseMoeBlock": Family("Qwen3-MoE", _NO_SHARED, _route_stacked, _mlp_only_layers("Qwen3MoeMLP")),
}  # fmt: skip


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


# -- saving condensed layers in the source architecture -------------------------------------------


def native_dense_reason(family: Family, config, layers: list[int], specs: list[CondensedSpec]) -> str | None:
    """Why `config` cannot express condensed layers `layers` (decoder indices) with shapes `specs`
    as its own dense layers; None when it can."""
    if family.dense is None:
        return f"{family.name} configs cannot make a layer dense"
    for layer, s in zip(layers, specs):
        if s.gated_neurons:
            return f"{family.name}'s dense layers have no shared-expert gate (sigmoid(g . x)) to hold layer {layer}'s"
        if not s.gated or s.in_bias or s.out_bias:
            return f"{family.name}'s dense layers are gated MLPs without biases, unlike condensed layer {layer}"
        if s.intermediate_size != config.intermediate_size:
            return (f"condensed layer {layer} has {s.intermediate_size} neurons but {family.name}'s dense layers "
                    f"have intermediate_size = {config.intermediate_size}")  # fmt: skip
    return family.dense.why_not(config, layers)


@torch.no_grad()
def native_dense_mlp(family: Family, moe: nn.Module, config, condensed: CondensedMLP) -> nn.Module:
    """The family's own dense MLP holding `condensed`'s weights (native_dense_reason must be None):
    gate_proj = in_proj[:n], up_proj = in_proj[n:], down_proj = out_proj."""
    cls = getattr(sys.modules[type(moe).__module__], family.dense.mlp_class)
    mlp = cls(config).to(device=condensed.in_proj.device, dtype=condensed.in_proj.dtype)
    gate, up = condensed.in_proj.chunk(2)
    mlp.gate_proj.weight.copy_(gate)
    mlp.up_proj.weight.copy_(up)
    mlp.down_proj.weight.copy_(condensed.out_proj)
    return mlp.eval()
