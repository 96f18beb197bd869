"""The one table of per-architecture knowledge.

Where each family keeps its decoder layers and MLP, what its projections are called, how its
activation is named in the config, and how a carved module is installed. Nothing else in
moecarve names a model_type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .carving.ffn import DenseFFN
from .errors import MoecarveError
from .modules.hf import source_model_type


class UnsupportedArchitecture(MoecarveError, ValueError):
    """The model's architecture is not in the adapter table."""


@dataclass(frozen=True)
class Adapter:
    """How one architecture family lays out its feed-forward layers.

    kind: "gated" (separate gate/up/down), "fused" (one gate_up projection, gate rows first)
          or "plain" (fc1 -> act -> fc2).
    layers: attribute path from the model to its list of decoder layers.
    mlp: attribute path from a decoder layer to its MLP module ("" when fc1/fc2 sit on the layer).
    proj: projection attribute names inside the MLP, in (gate, up, down) / (gate_up, down) /
          (fc1, fc2) order.
    act_keys: config attributes holding the activation name, first one present wins.
    conv1d: weights stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in].
    extra_identity: attributes of the MLP's owner to replace with Identity when `mlp` is "" (the
          carved module takes fc1's place and computes the whole FFN).
    """

    kind: str
    layers: str
    mlp: str
    proj: tuple[str, ...]
    act_keys: tuple[str, ...] = ("hidden_act",)
    conv1d: bool = False
    extra_identity: tuple[str, ...] = ()


# Gated MLPs at model.layers[i].mlp: down(act(gate x) * up x). Whatever a family adds around the MLP
# (scaled embeddings, Granite's multipliers, OLMo-2's norms after attention and MLP, Gemma's sandwich
# norms, q/k norms, sliding-window layers, rope scaling) lives outside the module a carve replaces.
_LLAMA_LIKE = Adapter(kind="gated", layers="model.layers", mlp="mlp", proj=("gate_proj", "up_proj", "down_proj"))
_GEMMA = Adapter(  # GeGLU, the activation named `hidden_activation` (older configs: `hidden_act`)
    kind="gated",
    layers="model.layers",
    mlp="mlp",
    proj=("gate_proj", "up_proj", "down_proj"),
    act_keys=("hidden_activation", "hidden_act"),
)
_FUSED = Adapter(kind="fused", layers="model.layers", mlp="mlp", proj=("gate_up_proj", "down_proj"))

ADAPTERS: dict[str, Adapter] = {
    **dict.fromkeys(
        ["llama", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "smollm3", "granite", "olmo", "olmo2", "olmo3",
         "cohere", "cohere2", "exaone4", "helium", "stablelm", "seed_oss", "hunyuan_v1_dense", "ernie4_5"],
        _LLAMA_LIKE,
    ),  # fmt: skip
    **dict.fromkeys(["gemma", "gemma2", "gemma3_text", "vaultgemma"], _GEMMA),
    **dict.fromkeys(["phi3", "glm", "glm4"], _FUSED),
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): only the language model is carved
    "gemma3": Adapter(
        kind="gated",
        layers="model.language_model.layers",
        mlp="mlp",
        proj=("gate_proj", "up_proj", "down_proj"),
        act_keys=("text_config.hidden_activation", "text_config.hidden_act"),
    ),
    "gpt2": Adapter(
        kind="plain",
        layers="transformer.h",
        mlp="mlp",
        proj=("c_fc", "c_proj"),
        act_keys=("activation_function",),
        conv1d=True,
    ),
    "opt": Adapter(
        kind="plain",
        layers="model.decoder.layers",
        mlp="",
        proj=("fc1", "fc2"),
        act_keys=("activation_function",),
        extra_identity=("activation_fn", "fc2"),
    ),
}


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> Adapter:
    """The adapter for a model or config, or UnsupportedArchitecture naming the supported ones."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):  # a carved model loaded with trust_remote_code: "moecarve_llama"
        model_type = source_model_type(model_type)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"cannot carve model_type {model_type!r}: supported architectures are {', '.join(supported())}"
        )
    return ADAPTERS[model_type]


def _get(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, adapter_for(model).layers)


def _lookup(config, path: str):
    """config's attribute at a dotted path ("text_config.hidden_activation"), or None."""
    for name in path.split("."):
        config = getattr(config, name, None)
    return config


def activation_name(config) -> str:
    """The FFN's activation (an ACT2FN name), read from the config where the family keeps it."""
    for key in adapter_for(config).act_keys:
        act = _lookup(config, key)
        if act:
            return act
    raise UnsupportedArchitecture(f"{config.model_type}: no activation found in {adapter_for(config).act_keys}")


def max_positions(config) -> int | None:
    """The longest sequence the model takes (a multimodal config keeps it in its text config), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "text_config.max_position_embeddings"):
        if _lookup(config, key):
            return int(_lookup(config, key))
    return None


def clip_seqlen(config, seqlen: int) -> int:
    """seqlen, clipped to the model's maximum positions where the config has one."""
    limit = max_positions(config)
    return min(seqlen, limit) if limit else seqlen


def mlp_path(config, layer_index: int) -> str:
    """Dotted path from the model to layer i's MLP module (or to the layer, for OPT)."""
    a = adapter_for(config)
    return ".".join(filter(None, [a.layers, str(layer_index), a.mlp]))


def ffn_input_module(config, layer: nn.Module) -> nn.Module:
    """The module whose input is the FFN input x (after the post-attention norm)."""
    a = adapter_for(config)
    owner = _get(layer, a.mlp)
    return owner if a.mlp else getattr(owner, a.proj[0])


def _weight(mod: nn.Module, conv1d: bool) -> torch.Tensor:
    w = mod.weight.detach()
    return w.t() if conv1d else w  # Conv1D keeps [in, out]


def _bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.detach()


def read_ffn(config, layer: nn.Module) -> DenseFFN:
    """The dense FFN of one decoder layer as tensors (views of the model's weights)."""
    a = adapter_for(config)
    owner = _get(layer, a.mlp)
    act = activation_name(config)
    if a.kind == "gated":
        g, u, dn = (getattr(owner, n) for n in a.proj)
        return DenseFFN(
            gate=_weight(g, a.conv1d), up=_weight(u, a.conv1d), down=_weight(dn, a.conv1d), act=act,
            gate_bias=_bias(g), up_bias=_bias(u), down_bias=_bias(dn),
        )  # fmt: skip
    if a.kind == "fused":
        gu, dn = (getattr(owner, n) for n in a.proj)
        gate, up = _weight(gu, a.conv1d).chunk(2, dim=0)
        gb = _bias(gu)
        gate_bias, up_bias = gb.chunk(2) if gb is not None else (None, None)
        return DenseFFN(
            gate=gate, up=up, down=_weight(dn, a.conv1d), act=act,
            gate_bias=gate_bias, up_bias=up_bias, down_bias=_bias(dn),
        )  # fmt: skip
    fc1, fc2 = (getattr(owner, n) for n in a.proj)
    return DenseFFN(up=_weight(fc1, a.conv1d), down=_weight(fc2, a.conv1d), act=act, up_bias=_bias(fc1), down_bias=_bias(fc2))


def replacements(config, layer_index: int, module: nn.Module) -> dict[str, nn.Module]:
    """Submodules to set (dotted path from the model -> module) to install a carved FFN."""
    a = adapter_for(config)
    base = mlp_path(config, layer_index)
    if a.mlp:
        return {base: module}
    out = {f"{base}.{a.proj[0]}": module}
    out.update({f"{base}.{name}": nn.Identity() for name in a.extra_identity})
    return out


def install(model: nn.Module, layer_index: int, module: nn.Module) -> dict[str, nn.Module]:
    """Replace layer i's FFN by `module` in place; returns what was set, by path."""
    repl = replacements(model.config, layer_index, module)
    for path, mod in repl.items():
        model.set_submodule(path, mod)
    return repl
