"""What the decode runtime needs to know of each architecture family: where the embedding,
attention, norms and lm_head live and how the family bends the canonical pre-norm decoder
(runtime/csrc/rt.h): norm kinds and (1 + w) offsets, extra norms, q/k norms, parallel blocks,
RoPE pairing and the layers without RoPE, scaled embeddings, multipliers, soft-capping, learned
positions. The FFN is read through moecarve.adapters (dense) or the carved module itself.

One table, keyed by model_type; nothing else in the runtime names a family. A family or a
setting the runtime does not implement is refused with one line naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import MoecarveError


class UnsupportedModel(MoecarveError, ValueError):
    """A model the decode runtime cannot run (a family or a feature it does not implement)."""


def _all(config, i: int, layer_type: str | None) -> bool:
    return True


@dataclass(frozen=True)
class Decoder:
    """How one family's decoder maps onto the runtime's canonical block.

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


_LLAMA = Decoder()
_GEMMA = Decoder(norm_offset=True, scales=_gemma_scales)
_GEMMA2 = replace(
    _GEMMA, norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
)
_OLMO2 = Decoder(norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm"), qk_norm="full")
_COHERE = Decoder(
    norms=("input_layernorm", None, "input_layernorm", None), norm="layer", parallel=lambda c: True,
    rope_interleaved=True, scales=lambda c: {"logit": c.logit_scale},
    check=lambda c: "Cohere with use_qk_norm (per-head norm weights)" if getattr(c, "use_qk_norm", False) else None,
)  # fmt: skip

DECODERS: dict[str, Decoder] = {
    **dict.fromkeys(["llama", "mistral", "ministral", "ministral3", "qwen2", "seed_oss"], _LLAMA),
    "qwen3": Decoder(qk_norm="head"),
    "smollm3": Decoder(rope_on=lambda c, i, t: bool(c.no_rope_layers[i])),
    "granite": Decoder(scales=_granite_scales),
    "helium": Decoder(rope_interleaved=True),
    "ernie4_5": Decoder(rope_interleaved=True),
    "glm": Decoder(qkv=None, rope_interleaved=True),
    "glm4": Decoder(
        norms=("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
        rope_interleaved=True,
    ),
    "hunyuan_v1_dense": Decoder(qk_norm="head", qk_names=("query_layernorm", "key_layernorm"), qk_after_rope=True),
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": replace(_GEMMA2, qk_norm="head"),
    "gemma3": replace(_GEMMA2, qk_norm="head", prefix="model.language_model"),
    "vaultgemma": replace(_GEMMA, norms=("input_layernorm", None, "pre_feedforward_layernorm", None)),
    "olmo": Decoder(
        norm="layer",
        eps=1e-5,
        check=lambda c: "OLMo with clip_qkv" if getattr(c, "clip_qkv", None) else None,
    ),
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
    "exaone4": replace(_OLMO2, qk_norm="head", rope_on=_sliding_only),
    "cohere": _COHERE,
    "cohere2": replace(_COHERE, rope_on=lambda c, i, t: t == "sliding_attention" and bool(c.sliding_window),
                       check=lambda c: None),
    "stablelm": Decoder(
        norms=("input_layernorm", None, "post_attention_layernorm", None), norm="layer",
        parallel=lambda c: bool(getattr(c, "use_parallel_residual", False)),
        check=lambda c: "StableLM with qk_layernorm (per-head norm weights)" if getattr(c, "qk_layernorm", False) else None,
    ),  # fmt: skip
    "phi3": Decoder(qkv="qkv_proj"),
    "gpt2": Decoder(
        prefix="transformer", embed="wte", final_norm="ln_f", attn="attn", qkv="c_attn", o="c_proj",
        norms=("ln_1", None, "ln_2", None), norm="layer", pos_embed="wpe", conv1d=True, check=_gpt2_check,
    ),
    "opt": Decoder(
        prefix="model.decoder", final_norm="final_layer_norm", o="out_proj",
        norms=("self_attn_layer_norm", None, "final_layer_norm", None), norm="layer",
        pos_embed="embed_positions", pos_offset=2, check=_opt_check,
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
