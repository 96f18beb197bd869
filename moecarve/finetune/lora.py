"""LoRA adapters on a (carved) model, and merging them back into ordinary weights.

Two kinds of adapter (moecarve.finetune's own training):
- nn.Linear / Conv1D layers of the decoder (attention projections) get PEFT LoRA, injected in
  place into the model (the model object keeps its class; PEFT only wraps the linear layers).
- Stacked expert weights (RoutedExperts.in_proj [E, 2m, d], out_proj [E, d, m]; SharedExpert
  in_proj [2n, d], out_proj [d, n]) get per-expert factors A [E, r, in], B [E, out, r] held
  stacked, applied as a torch parametrization: W' = W + (alpha / r) * B @ A. The forward code of
  CarvedMoE is untouched, and merging is removing the parametrization with its value kept.

With PEFT alone, `lora_config(model)` puts PEFT's LoRA on the same weights: target_modules for the
linear layers and target_parameters (PEFT's ParamWrapper, LoRA on an nn.Parameter) for the stacked
expert weights, which PEFT reads as [E, out, in], the layout of transformers' own MoE experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import adapters
from ..modules.moe import CarvedMoE, requantize_shadows

EXPERT_WEIGHTS = ("experts.in_proj", "experts.out_proj", "shared.in_proj", "shared.out_proj")


class StackedLoRA(nn.Module):
    """A low-rank delta for a stacked weight W [E, out, in] (or a plain [out, in]).

    A [E, r, in] starts like PEFT's (Kaiming-uniform), B [E, out, r] at zero, so the adapted
    weight equals W until B moves. forward(W) = W + scaling * B @ A, in W's dtype.
    """

    def __init__(self, shape: torch.Size, r: int, scaling: float, generator: torch.Generator | None = None):
        super().__init__()
        *lead, out_f, in_f = shape
        E = lead[0] if lead else 1
        self.stacked = bool(lead)
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) on [r, in], as nn.Linear / PEFT
        self.A = nn.Parameter(torch.empty(E, r, in_f).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(E, out_f, r))
        self.scaling = scaling

    def delta(self) -> torch.Tensor:  # [E, out, in] (or [out, in])
        d = torch.bmm(self.B, self.A) * self.scaling
        return d if self.stacked else d[0]

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) with delta[e] = scaling * B[e] @ A[e] (detached)."""
        return self.A.detach(), self.B.detach()

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta().to(W.dtype)


class FlatLoRA(nn.Module):
    """One low-rank delta over all the experts of a stacked weight, for experts too small to hold a
    rank-r delta each (single neurons: a per-expert rank-8 delta of a [2, d] in_proj row pair has
    more parameters than the rows themselves).

    in_proj [E, rows, d] is the matrix [E * rows, d] (the dense gate/up rows, regrouped); out_proj
    [E, d, m] is the matrix [d, E * m] (the dense down_proj's columns): delta = scaling * B @ A on
    that matrix, B [out, r] at zero, A [r, in] Kaiming-uniform as PEFT's, so the adapted weight
    equals W until B moves. `columns` says which layout: out_proj's (True) or in_proj's.
    """

    def __init__(self, shape: torch.Size, r: int, scaling: float, columns: bool, generator: torch.Generator | None = None):
        super().__init__()
        E, out_f, in_f = shape
        self.shape, self.columns = tuple(shape), columns
        rows, cols = (out_f, E * in_f) if columns else (E * out_f, in_f)
        bound = 1.0 / math.sqrt(cols)
        self.A = nn.Parameter(torch.empty(r, cols).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(rows, r))
        self.scaling = scaling

    def delta(self) -> torch.Tensor:  # [E, out, in]
        d = (self.B @ self.A) * self.scaling
        E, out_f, in_f = self.shape
        return d.view(out_f, E, in_f).permute(1, 0, 2) if self.columns else d.view(E, out_f, in_f)

    @property
    def stacked(self) -> bool:
        return True

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same delta as per-expert factors (A [E, r, in], B [E, out, r], delta[e] = scaling * B[e] @ A[e]):
        in_proj's experts share A and own B's rows, out_proj's share B and own A's columns (detached)."""
        E, out_f, in_f = self.shape
        A, B = self.A.detach(), self.B.detach()
        r = A.shape[0]
        if self.columns:  # delta[e] = B @ A[:, e*in:(e+1)*in]
            return A.view(r, E, in_f).permute(1, 0, 2).contiguous(), B.expand(E, out_f, r).contiguous()
        return A.expand(E, r, in_f).contiguous(), B.view(E, out_f, r).contiguous()  # delta[e] = B[e*out:(e+1)*out] @ A

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta().to(W.dtype)


def expert_lora(shape: torch.Size, r: int, scaling: float, out_proj: bool, generator: torch.Generator | None = None) -> nn.Module:
    """The adapter of one expert weight: per expert (StackedLoRA) where each expert's matrix has
    more than r rows and columns, else one over all experts (FlatLoRA)."""
    if len(shape) == 3 and min(shape[1], shape[2]) <= r:
        return FlatLoRA(shape, r, scaling, columns=out_proj, generator=generator)
    return StackedLoRA(shape, r, scaling, generator=generator)


def carved_layers(model: nn.Module) -> dict[str, CarvedMoE]:
    """Dotted path -> CarvedMoE module, for every carved layer of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CarvedMoE)}


def linear_targets(model: nn.Module) -> list[str]:
    """Full names of the nn.Linear / Conv1D layers inside the decoder layers (not lm_head).

    In a carved model the FFNs hold no linear layer, so these are the attention projections.
    """
    from transformers.pytorch_utils import Conv1D

    layers = adapters.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [
        f"{prefix}.{n}" for n, m in layers.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    ]


def expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the stacked expert weights of every carved layer ("model.layers.0.mlp.experts.in_proj", ...);
    a layer without shared experts (S0...) has only the routed ones."""
    return [f"{path}.{w}" for path, moe in carved_layers(model).items() for w in EXPERT_WEIGHTS
            if getattr(moe, w.split(".")[0], None) is not None]  # fmt: skip


def add_expert_lora(model: nn.Module, r: int, scaling: float, seed: int = 0) -> list[str]:
    """Parametrize every stacked expert weight of every carved layer (expert_lora: per expert, or
    one delta over all of a layer's experts where they are smaller than the rank); returns their names."""
    g = torch.Generator().manual_seed(seed)
    names = expert_parameters(model)
    for name in names:
        owner_path, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_path)
        W = getattr(owner, attr)
        lora = expert_lora(W.shape, r, scaling, out_proj=attr == "out_proj", generator=g).to(W.device)
        parametrize.register_parametrization(owner, attr, lora)
    return names


def peft_lora_config(r: int, alpha: float, modules: list[str], parameters: list[str], dropout: float = 0.0):
    """A PEFT LoraConfig on exactly these linear layers and parameters (full names). PEFT's LoRA on
    parameters refuses input dropout, so any dropout applies only where there are no parameters."""
    from peft import LoraConfig

    # an empty list, not None: None would make PEFT pick its default modules for the model type
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if parameters else dropout, target_modules=modules,
                      target_parameters=parameters or None, bias="none")  # fmt: skip


def lora_config(model: nn.Module, r: int = 8, alpha: float = 32.0, attention: bool = True, experts: bool = True):
    """A PEFT LoraConfig for a carved model: LoRA on the decoder's linear layers (the attention
    projections) and on every stacked expert weight, for `peft.get_peft_model(model, config)`.

    Train it with any trainer; `merge_and_unload()` folds it in (the result saves with moecarve.save),
    `save_pretrained(dir)` writes a PEFT adapter that `PeftModel.from_pretrained(moecarve.load(carved), dir)`
    applies. Without dropout: PEFT's LoRA on parameters refuses it.
    """
    return peft_lora_config(r, alpha, linear_targets(model) if attention else [], expert_parameters(model) if experts else [])


def add_linear_lora(model: nn.Module, r: int, alpha: float, dropout: float):
    """Inject PEFT LoRA into the decoder's linear layers, in place (the model object is kept; the
    returned PeftModel wrapper is not needed afterwards), or None when there is no such layer."""
    import warnings

    from peft import get_peft_model

    targets = linear_targets(model)
    if not targets:
        return None
    cfg = peft_lora_config(r, alpha, targets, [], dropout)
    with warnings.catch_warnings():  # GPT-2 Conv1D: PEFT warns that it sets fan_in_fan_out itself
        warnings.simplefilter("ignore")
        return get_peft_model(model, cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model becomes an ordinary carved
    model, its shadow routers re-quantised from the merged expert rows (else they would score
    the experts as they were before fine-tuning)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):  # PEFT LoRA layer: merge, then put the base layer back
            m.merge()
            model.set_submodule(name, m.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # get_peft_model marks the base model
        if attr in vars(model):
            delattr(model, attr)
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for pname in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    requantize_shadows(model)
    return model
