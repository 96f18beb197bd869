"""The one table of per-architecture knowledge.

Where each family keeps its decoder layers and MLP, what its projections are called, how its
activation is named in the config, and how a carved module is installed (`Adapter`); and how the
rest of its decoder block departs from the canonical pre-norm block the decode runtime computes
(`Decoder`: norms, q/k norms, RoPE pairing, multipliers, parallel blocks ...). Nothing else in
moecarve names a model_type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .carving.ffn import DenseFFN
from .errors import MoecarveError
from .modules.hf import source_model_type


class UnsupportedArchitecture(MoecarveError, ValueError):
    """The model's architecture is not in the adapter table."""


def _all(config, i: int, layer_type: str | None) -> bool:
    return True


@dataclass(frozen=True)
class Decoder:
    """How one family's decoder block maps onto the decode runtime's canonical one (runtime/csrc/rt.h).

    prefix: path from the model to its decoder ("model", "model.language_model", ...): embed,
    final_norm live under it; lm_head is the model's output embedding.
    attn: path from a decoder layer to its attention module; q, k, v, o the projections inside it
    (qkv instead where they are fused, q rows then k then v).
    norms: the layer's (pre-attention, post-attention, pre-FFN, post-FFN) norm attributes, None
    where the family has none (Llama: input_layernorm and post_attention_layernorm, which despite
    its name normalises the FFN's input).
    norm: "rms" or "layer"; norm_offset: the weight is applied as (1 + w) (Gemma); eps: for norm
    modules that do not keep theirs.
    qk_norm: "head" (per head), "full" (over all heads, OLMo-2) or None; qk_names its modules;
    qk_after_rope: applied after RoPE (HunYuan).
    parallel: config -> whether attention and FFN both read the layer's input (Cohere).
    rope_interleaved: RoPE pairs (2i, 2i+1) instead of (i, i + rot/2).
    rope_on: (config, layer, layer_type) -> whether that layer applies RoPE.
    pos_embed / pos_offset: learned absolute positions (GPT-2, OPT: row pos + 2).
    conv1d: weights stored [in, out] (GPT-2's Conv1D).
    scales: config -> the multipliers that differ from 1 / the default: "embed", "residual",
    "attn" (the attention score scale, default head_dim ** -0.5), "logit", "attn_softcap",
    "final_softcap".
    check: config -> why the runtime cannot run this model, or None.
    """

    prefix: str = "model"
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    norms: tuple[str | None, str | None, str | None, str | None] = ("input_layernorm", None, "post_attention_layernorm", None)
    norm: str = "rms"
    norm_offset: bool = False
    eps: float | None = None  # for norm modules that keep no epsilon (OLMo's is fixed at 1e-5)
    qk_norm: str | None = None
    qk_names: tuple[str, str] = ("q_norm", "k_norm")
    qk_after_rope: bool = False
    parallel: Callable[[object], bool] = field(default=lambda c: False)
    rope_interleaved: bool = False
    rope_on: Callable[[object, int, str | None], bool] = _all
    pos_embed: str | None = None
    pos_offset: int = 0
    conv1d: bool = False
    scales: Callable[[object], dict] = field(default=lambda c: {})
    check: Callable[[object], str | None] = field(default=lambda c: None)


def _gemma_scales(c) -> dict:
    out = {"embed": math.sqrt(c.hidden_size)}
    if getattr(c, "query_pre_attn_scalar", None):
        out["attn"] = c.query_pre_attn_scalar**-0.5
    if getattr(c, "attn_logit_softcapping", None):
        out["attn_softcap"] = c.attn_logit_softcapping
    if getattr(c, "final_logit_softcapping", None):
        out["final_softcap"] = c.final_logit_softcapping
    return out


def _granite_scales(c) -> dict:
    return {"embed": c.embedding_multiplier, "residual": c.residual_multiplier, "attn": c.attention_multiplier,
            "logit": 1.0 / c.logits_scaling}  # fmt: skip


def _opt_check(c) -> str | None:
    if not getattr(c, "do_layer_norm_before", True):
        return "OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m)"
    if getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size:
        return "OPT with project_in/project_out (word_embed_proj_dim != hidden_size)"
    return None


def _gpt2_check(c) -> str | None:
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        return "GPT-2 with scale_attn_by_inverse_layer_idx"
    if not getattr(c, "scale_attn_weights", True):
        return "GPT-2 without scale_attn_weights"
    return None


def _sliding_only(c, i: int, layer_type: str | None) -> bool:
    """Cohere 2 / EXAONE 4: RoPE on the sliding-window layers only (global layers use no positions)."""
    return layer_type != "full_attention" or not getattr(c, "sliding_window", None)


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
    decoder: the rest of the block, for the decode runtime.
    """

    kind: str
    layers: str
    mlp: str
    proj: tuple[str, ...]
    act_keys: tuple[str, ...] = ("hidden_act",)
    conv1d: bool = False
    extra_identity: tuple[str, ...] = ()
    decoder: Decoder = Decoder()


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

_GEMMA_DECODER = Decoder(norm_offset=True, scales=_gemma_scales)
_GEMMA2_DECODER = replace(
    _GEMMA_DECODER,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
)
_OLMO2_DECODER = Decoder(norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm"), qk_norm="full")
_COHERE_DECODER = Decoder(
    norms=("input_layernorm", None, "input_layernorm", None), norm="layer", parallel=lambda c: True,
    rope_interleaved=True, scales=lambda c: {"logit": c.logit_scale},
    check=lambda c: "Cohere with use_qk_norm (per-head norm weights)" if getattr(c, "use_qk_norm", False) else None,
)  # fmt: skip


def _like(base: Adapter, **decoder) -> Adapter:
    return replace(base, decoder=Decoder(**decoder))


ADAPTERS: dict[str, Adapter] = {
    **dict.fromkeys(["llama", "mistral", "ministral", "ministral3", "qwen2", "seed_oss"], _LLAMA_LIKE),
    "qwen3": _like(_LLAMA_LIKE, qk_norm="head"),
    "smollm3": _like(_LLAMA_LIKE, rope_on=lambda c, i, t: bool(c.no_rope_layers[i])),
    "granite": _like(_LLAMA_LIKE, scales=_granite_scales),
    "helium": _like(_LLAMA_LIKE, rope_interleaved=True),
    "ernie4_5": _like(_LLAMA_LIKE, rope_interleaved=True),
    "hunyuan_v1_dense": _like(_LLAMA_LIKE, qk_norm="head", qk_names=("query_layernorm", "key_layernorm"),
                              qk_after_rope=True),
    "olmo": _like(_LLAMA_LIKE, norm="layer", eps=1e-5,
                  check=lambda c: "OLMo with clip_qkv" if getattr(c, "clip_qkv", None) else None),
    "olmo2": replace(_LLAMA_LIKE, decoder=_OLMO2_DECODER),
    "olmo3": replace(_LLAMA_LIKE, decoder=_OLMO2_DECODER),
    "exaone4": replace(_LLAMA_LIKE, decoder=replace(_OLMO2_DECODER, qk_norm="head", rope_on=_sliding_only)),
    "cohere": replace(_LLAMA_LIKE, decoder=_COHERE_DECODER),
    "cohere2": replace(_LLAMA_LIKE, decoder=replace(
        _COHERE_DECODER, rope_on=lambda c, i, t: t == "sliding_attention" and bool(c.sliding_window), check=lambda c: None)),
    "stablelm": _like(
        _LLAMA_LIKE, norms=("input_layernorm", None, "post_attention_layernorm", None), norm="layer",
        parallel=lambda c: bool(getattr(c, "use_parallel_residual", False)),
        check=lambda c: "StableLM with qk_layernorm (per-head norm weights)" if getattr(c, "qk_layernorm", False) else None,
    ),
    "gemma": replace(_GEMMA, decoder=_GEMMA_DECODER),
    "gemma2": replace(_GEMMA, decoder=_GEMMA2_DECODER),
    "gemma3_text": replace(_GEMMA, decoder=replace(_GEMMA2_DECODER, qk_norm="head")),
    "vaultgemma": replace(_GEMMA, decoder=replace(_GEMMA_DECODER, norms=("input_layernorm", None, "pre_feedforward_layernorm", None))),
    "phi3": _like(_FUSED, qkv="qkv_proj"),
    "glm": _like(_FUSED, rope_interleaved=True),
    "glm4": _like(
        _FUSED, norms=("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
        rope_interleaved=True,
    ),
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): only the language model is carved
    "gemma3": Adapter(
        kind="gated",
        layers="model.language_model.layers",
        mlp="mlp",
        proj=("gate_proj", "up_proj", "down_proj"),
        act_keys=("text_config.hidden_activation", "text_config.hidden_act"),
        decoder=replace(_GEMMA2_DECODER, qk_norm="head", prefix="model.language_model"),
    ),
    "gpt2": Adapter(
        kind="plain",
        layers="transformer.h",
        mlp="mlp",
        proj=("c_fc", "c_proj"),
        act_keys=("activation_function",),
        conv1d=True,
        decoder=Decoder(prefix="transformer", embed="wte", final_norm="ln_f", attn="attn", qkv="c_attn", o="c_proj",
                        norms=("ln_1", None, "ln_2", None), norm="layer", pos_embed="wpe", conv1d=True, check=_gpt2_check),
    ),
    "opt": Adapter(
        kind="plain",
        layers="model.decoder.layers",
        mlp="",
        proj=("fc1", "fc2"),
        act_keys=("activation_function",),
        extra_identity=("activation_fn", "fc2"),
        decoder=Decoder(prefix="model.decoder", final_norm="final_layer_norm", o="out_proj",
                        norms=("self_attn_layer_norm", None, "final_layer_norm", None), norm="layer",
                        pos_embed="embed_positions", pos_offset=2, check=_opt_check),
    ),
}  # fmt: skip


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


def ffn_output_module(config, layer: nn.Module) -> nn.Module:
    """The FFN's last projection (down_proj, fc2, c_proj): its output is the FFN output."""
    a = adapter_for(config)
    return getattr(_get(layer, a.mlp), a.proj[-1])


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
