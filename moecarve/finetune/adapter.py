"""A fine-tune's adapter alone, in PEFT's format, and applying it to a carved folder.

`finetune(..., merge=False)` leaves the LoRA factors unmerged; `save_adapter` writes them as a
PEFT adapter folder:
    adapter_config.json          a LoraConfig: target_modules = the trained linear layers,
                                 target_parameters = the stacked expert weights (PEFT's LoRA on
                                 nn.Parameters, ParamWrapper)
    adapter_model.safetensors    the LoRA factors under PEFT's names
    moecarve_router.safetensors  the routers' trained scale s and load-balancing bias (not LoRA)
Each stacked factor pair (A [E, r, in], B [E, out, r], W' = W + (alpha / r) B @ A) is written in
PEFT's ParamWrapper layout, which computes the same delta.

    model = load_adapter("out/carved", "out/adapter")                 # merged: the fine-tuned model
    model = PeftModel.from_pretrained(moecarve.load("out/carved"), "out/adapter")  # LoRA only
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from ..errors import MoecarveError
from ..io.atomic import atomic_dir
from ..io.save import ordinary_permissions
from ..modules.moe import requantize_shadows
from .config import FinetuneConfig
from .lora import FlatLoRA, StackedLoRA, carved_layers, peft_lora_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROUTER_FILE = "moecarve_router.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's names start at the PeftModel wrapper


class AdapterError(MoecarveError, ValueError):
    """A model without unmerged adapters to save, or an adapter that does not fit the model."""


def _linear_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A [r, in], B [out, r]) of every PEFT LoRA linear layer."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper) and "default" in m.lora_A}  # fmt: skip


def _stacked_factors(model: nn.Module) -> dict[str, StackedLoRA | FlatLoRA]:
    """Parameter name -> its StackedLoRA or FlatLoRA, for every parametrized expert weight."""
    out = {}
    for path, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                out.update({f"{path}.{attr}": p for p in plist if isinstance(p, (StackedLoRA, FlatLoRA))})
    return out


def _peft_factors(lora: StackedLoRA | FlatLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A.weight, lora_B.weight) of PEFT's ParamWrapper computing lora's delta.

    A 3-D weight [E, out, in]: PEFT keeps A as [E*r, in] (expert-major rows) and B as [out, r*E]
    (expert-minor columns) and adds scaling * B_e @ A_e to expert e; a 2-D weight is plain LoRA.
    A FlatLoRA (one delta over all experts) is written as its equal per-expert factors.
    """
    A, B = lora.expert_factors()  # [E, r, in], [E, out, r]
    if not lora.stacked:
        return A[0], B[0]
    E, r, n_in = A.shape
    return A.reshape(E * r, n_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _layout(model: nn.Module, lora_cfg):
    """The PEFT model of `lora_cfg` on a meta-device copy of `model`'s architecture: PEFT's own names
    and shapes of every LoRA factor, without touching `model` or allocating weights."""
    from peft import get_peft_model

    meta = getattr(model.config, "moecarve", None) or {}
    if meta.get("modules"):  # carved in memory (the source class) or loaded (the carved class)
        from ..io.remote import carved_class
        from ..io.save import base_class_name

        cls = carved_class(base_class_name(model))
    else:
        cls = type(model)
    with torch.device("meta"):
        skeleton = cls._from_config(copy.deepcopy(model.config))
    return get_peft_model(skeleton, lora_cfg)


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: FinetuneConfig, base_model: str | None = None,
                 overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write the unmerged adapters of `model` (after finetune(..., merge=False)) as a PEFT adapter
    folder, atomically; the model is not changed.

    cfg: the FinetuneConfig it was trained with (rank and alpha). base_model: the folder or hub
    id the adapter applies to, recorded in adapter_config.json. extra_files: name -> text.
    """
    from peft.tuners.lora import ParamWrapper
    from peft.utils import get_peft_model_state_dict

    linear, stacked = _linear_factors(model), _stacked_factors(model)
    if not linear and not stacked:
        raise AdapterError("the model holds no unmerged LoRA adapters: fine-tune it with finetune(..., merge=False)")
    lora_cfg = peft_lora_config(cfg.lora_r, cfg.lora_alpha, sorted(linear), sorted(stacked))
    layout = _layout(model, lora_cfg)
    lora_cfg.base_model_name_or_path = base_model  # after get_peft_model, which resets it
    tensors = {}
    for key, want in get_peft_model_state_dict(layout).items():
        module_path, factor = key.removesuffix(".weight").rsplit(".", 1)  # factor: lora_A or lora_B
        module = layout.get_submodule(module_path)
        ours = module_path.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            pair = _peft_factors(stacked[f"{ours}.{module.parameter_name}"])
        else:
            pair = linear[ours]
        t = pair[0 if factor == "lora_A" else 1]
        if tuple(t.shape) != tuple(want.shape):
            raise AdapterError(f"{key}: factor of shape {tuple(t.shape)} where PEFT expects {tuple(want.shape)}")
        tensors[key] = t.detach().to("cpu").contiguous()
    routers = {f"{p}.router.{n}": getattr(m.router, n).detach().cpu().contiguous()
               for p, m in carved_layers(model).items() for n in ("scale", "bias")}  # fmt: skip
    with atomic_dir(out_dir, overwrite) as tmp:
        lora_cfg.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if routers:
            save_file(routers, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        ordinary_permissions(tmp)
    return Path(out_dir)


def load_adapter(model_or_dir: nn.Module | str | Path, adapter_dir: str | Path, merge: bool = True, **load_kwargs):
    """Apply an adapter folder written by save_adapter to a model (in place) or a model folder
    (carved: moecarve.load, else transformers; load_kwargs go to the loader).

    Returns the merged model (merge=True: the fine-tuned model, its shadow routers re-quantised
    from the merged experts, saveable with moecarve.save), or the PeftModel (merge=False; after a
    merge_and_unload of your own, call moecarve.modules.moe.requantize_shadows(model)).
    """
    from peft import PeftModel

    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        from ..io.loading import is_carved
        from ..io.save import load

        if is_carved(model_or_dir):
            model = load(model_or_dir, **load_kwargs)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_or_dir, **load_kwargs)
    router_file = Path(adapter_dir) / ROUTER_FILE
    if router_file.exists():
        unexpected = model.load_state_dict(load_file(str(router_file)), strict=False).unexpected_keys
        if unexpected:
            raise AdapterError(f"{adapter_dir} does not fit this model: it has no {unexpected[:3]}")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not merge:
        return peft_model
    merged = peft_model.merge_and_unload()
    requantize_shadows(merged)  # the shadow routers score the merged experts
    return merged
