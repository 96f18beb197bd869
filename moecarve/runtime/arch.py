"""What the decode runtime needs to know of each architecture family: where the embedding,
attention, norms and lm_head live and how the family bends the canonical pre-norm decoder
(runtime/csrc/rt.h): norm kind and (1 + w) offsets, extra norms, scaled embeddings, multipliers,
soft-capping, learned positions. The FFN is read through moecarve.adapters (dense) or the carved
module itself.

One table, keyed by model_type; nothing else in the runtime names a family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MoecarveError


class UnsupportedModel(MoecarveError, ValueError):
    """A model the decode runtime cannot run (a family or a feature it does not implement)."""


@dataclass(frozen=True)
class Decoder:
    """How one family's decoder maps onto the runtime's canonical block.

    embed / final_norm / lm_head: attribute paths from the model.
    attn: path from a decoder layer to its attention module; q, k, v, o the projections inside it
    (qkv instead of q, k, v where they are fused, q rows then k then v).
    norms: the layer's (pre-attention, post-attention, pre-FFN, post-FFN) norm attributes, None
    where the family has none (Llama: input_layernorm and post_attention_layernorm, which despite
    its name normalises the FFN's input).
    norm: "rms" or "layer"; norm_offset: the weight is applied as (1 + w) (Gemma).
    qk_norm: "head" (per head, Qwen3 / Gemma 3) or "full" (over all heads, OLMo-2) or None.
    pos_embed / pos_offset: learned absolute positions (GPT-2, OPT: row pos + 2).
    conv1d: weights stored [in, out] (GPT-2's Conv1D).
    scales: config -> the multipliers that differ from 1 / the default: "embed", "residual",
    "attn" (the attention score scale, default head_dim ** -0.5), "logit", "attn_softcap",
    "final_softcap".
    check: config -> why the runtime cannot run this model, or None.
    """

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    norms: tuple[str | None, str | None, str | None, str | None] = ("input_layernorm", None, "post_attention_layernorm", None)
    norm: str = "rms"
    norm_offset: bool = False
    eps_keys: tuple[str, ...] = ("rms_norm_eps",)
    qk_norm: str | None = None
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


_LLAMA = Decoder()
_GEMMA = Decoder(norm_offset=True, scales=_gemma_scales)
_GEMMA2 = Decoder(
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    norm_offset=True,
    scales=_gemma_scales,
)

DECODERS: dict[str, Decoder] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": Decoder(qk_norm="head"),
    "granite": Decoder(scales=_granite_scales),
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": Decoder(**{**_GEMMA2.__dict__, "qk_norm": "head"}),
    "phi3": Decoder(qkv="qkv_proj"),
    "olmo2": Decoder(norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm"), qk_norm="full"),
    "gpt2": Decoder(
        embed="transformer.wte", final_norm="transformer.ln_f", attn="attn", qkv="c_attn", o="c_proj",
        norms=("ln_1", None, "ln_2", None), norm="layer", eps_keys=("layer_norm_epsilon",),
        pos_embed="transformer.wpe", conv1d=True, check=_gpt2_check,
    ),
    "opt": Decoder(
        embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm", o="out_proj",
        norms=("self_attn_layer_norm", None, "final_layer_norm", None), norm="layer", eps_keys=("layer_norm_eps",),
        pos_embed="model.decoder.embed_positions", pos_offset=2, check=_opt_check,
    ),
}  # fmt: skip


def decoder_for(model_type: str, config) -> Decoder:
    """The family's entry, or UnsupportedModel naming what is missing."""
    if model_type not in DECODERS:
        raise UnsupportedModel(f"the decode runtime cannot run model_type {model_type!r} (it runs "
                               f"{', '.join(sorted(DECODERS))}); use the reference forward (--engine hf)")  # fmt: skip
    dec = DECODERS[model_type]
    why = dec.check(config)
    if why:
        raise UnsupportedModel(f"the decode runtime cannot run {why}; use the reference forward (--engine hf)")
    return dec
