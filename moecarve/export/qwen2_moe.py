"""Export a carved LLaMA / Mistral / Qwen2 model as a standard Qwen2-MoE checkpoint.

Qwen2-MoE (transformers' Qwen2MoeForCausalLM, served by vLLM) has the source families' attention
(RMSNorm, RoPE, GQA, q/k/v biases, no o_proj bias), one shared expert gated by
sigmoid(shared_expert_gate . x), and a softmax-over-a-linear-gate router. The mapping is exact:

- shared: moecarve's N_s shared experts already form one MLP of N_s * m neurons; the exported
  `shared_expert_gate` is zero, so sigmoid(0) = 1/2 scales it, which a doubled `down_proj` undoes
  (multiplying by 2 is exact in floating point). With N_s = 0 the shared expert gets zero weights.
- routed: `gate_up_proj` [E, 2m, d] (gate rows first) and `down_proj` [E, d, m] are moecarve's
  stacked `in_proj` / `out_proj`; the router's per-expert factor (1 + scale_e) is folded into
  `down_proj[e]` (moecarve multiplies the expert output by it, Qwen2-MoE does not).
- router: moecarve's LinearRouter with zero selection bias computes Qwen2-MoE's TopKRouter exactly
  (softmax in float32, top-k of the probabilities, optional renormalisation = norm_topk_prob).
- attention: q/k/v biases are copied, or zero where the source has none (qkv_bias=True, the
  layout every Qwen2-MoE loader expects); RoPE parameters, norms' epsilon and tied embeddings carry
  over unchanged. Layers left dense become `mlp_only_layers`.

Anything that would not be exact is refused with an ExportError naming it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from .. import adapters
from ..modules.moe import CarvedMoE
from .errors import ExportError

SOURCES = ("llama", "mistral", "qwen2")  # same decoder layer as Qwen2-MoE up to q/k/v biases
FORMAT = "qwen2_moe"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_source(model: nn.Module) -> None:
    """Refuse, with the reason, any source setting that Qwen2-MoE cannot reproduce exactly."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SOURCES:
        raise ExportError(
            f"cannot export model_type {kind!r} to {FORMAT}: its decoder layer differs from Qwen2-MoE's "
            f"(supported sources: {', '.join(SOURCES)})"
        )
    if _head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        raise ExportError(
            f"head_dim {_head_dim(cfg)} != hidden_size / num_attention_heads "
            f"({cfg.hidden_size // cfg.num_attention_heads}): Qwen2-MoE derives the head size from them"
        )
    if getattr(cfg, "attention_bias", False):
        raise ExportError("the source has an o_proj bias (attention_bias=True); Qwen2-MoE's o_proj has none")
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = getattr(cfg, "sliding_window", None)
    uses_window = kind == "mistral" and sliding is not None and sliding < cfg.max_position_embeddings
    if "sliding_attention" in layer_types or uses_window:
        raise ExportError(
            f"the source uses sliding-window attention (window {sliding}); the {FORMAT} export supports "
            "full attention only"
        )
    if getattr(cfg, "hidden_act", None) is None:
        raise ExportError("the source config names no hidden_act")


def _moe_layers(model: nn.Module) -> dict[int, CarvedMoE | None]:
    """Layer index -> its CarvedMoE, or None for a layer left dense; refuses anything else."""
    out: dict[int, CarvedMoE | None] = {}
    for i, layer in enumerate(adapters.decoder_layers(model)):
        mlp = layer.mlp
        if isinstance(mlp, CarvedMoE):
            out[i] = mlp
        elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            out[i] = None
        else:
            raise ExportError(f"layer {i}'s FFN is a {type(mlp).__name__}, which {FORMAT} cannot represent")
    if not any(m is not None for m in out.values()):
        raise ExportError("the model has no carved MoE layer to export")
    return out


def check_moe(i: int, moe: CarvedMoE, hidden_act: str) -> None:
    """Refuse a carved layer that Qwen2-MoE cannot compute exactly."""
    s = moe.spec
    if s.router != "linear":
        raise ExportError(
            f"layer {i} uses the {s.router!r} router, which Qwen2-MoE's softmax-over-a-linear-gate router "
            "cannot express; carve with --method cmoe --router linear (CarveConfig(method='cmoe', router='linear'))"
        )
    if not s.gated or s.in_bias or s.out_bias:
        raise ExportError(f"layer {i}: Qwen2-MoE experts are bias-free gated MLPs (gated={s.gated}, "
                          f"in_bias={s.in_bias}, out_bias={s.out_bias})")  # fmt: skip
    if s.act != hidden_act:
        raise ExportError(f"layer {i}: expert activation {s.act!r} differs from the model's hidden_act {hidden_act!r}")
    if torch.any(moe.router.bias != 0):
        raise ExportError(
            f"layer {i}: the router has a load-balancing selection bias; Qwen2-MoE selects on the "
            "probabilities alone"
        )


def _shape(moe: CarvedMoE) -> tuple:
    s = moe.spec
    return (s.expert_size, s.n_shared, s.n_routed, s.top_k, s.norm_topk_prob)


def build_config(model: nn.Module, moes: dict[int, CarvedMoE | None]) -> Qwen2MoeConfig:
    """The Qwen2MoeConfig equivalent to the carved model; every carved layer must share one shape."""
    src = model.config
    carved = [m for m in moes.values() if m is not None]
    shapes = {_shape(m) for m in carved}
    if len(shapes) > 1:
        raise ExportError(f"carved layers differ in shape {sorted(shapes)}; Qwen2-MoE has one MoE shape")
    m, n_shared, n_routed, top_k, norm = shapes.pop()
    return Qwen2MoeConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,  # only for layers left dense
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        rope_parameters=dict(src.rope_parameters),
        use_sliding_window=False,
        attention_dropout=getattr(src, "attention_dropout", 0.0),
        decoder_sparse_step=1,
        moe_intermediate_size=m,
        shared_expert_intermediate_size=max(n_shared, 1) * m,  # N_s = 0: one zero expert
        num_experts_per_tok=top_k,
        num_experts=n_routed,
        norm_topk_prob=norm,
        mlp_only_layers=[i for i, mod in moes.items() if mod is None],
        qkv_bias=True,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        dtype=src.dtype,
    )


@torch.no_grad()
def moe_tensors(moe: CarvedMoE, prefix: str, hidden_size: int) -> dict[str, torch.Tensor]:
    """Qwen2MoeSparseMoeBlock weights (names under `prefix`) computing exactly what `moe` computes."""
    s, dt = moe.spec, moe.experts.in_proj.dtype
    factor = (1.0 + moe.router.scale.float())[:, None, None]  # [E, 1, 1] moecarve's per-expert weight factor
    out = {
        f"{prefix}.gate.weight": moe.router.weight,
        f"{prefix}.experts.gate_up_proj": moe.experts.in_proj,
        f"{prefix}.experts.down_proj": (moe.experts.out_proj.float() * factor).to(dt),
        f"{prefix}.shared_expert_gate.weight": torch.zeros(1, hidden_size, dtype=dt),  # sigmoid(0) = 1/2
    }
    if moe.shared is not None:
        gate, up = moe.shared.in_proj.chunk(2, dim=0)
        down = moe.shared.out_proj * 2  # undoes the 1/2 of the zero shared_expert_gate
    else:
        gate = up = torch.zeros(s.expert_size, hidden_size, dtype=dt)
        down = torch.zeros(hidden_size, s.expert_size, dtype=dt)
    out.update({f"{prefix}.shared_expert.gate_proj.weight": gate, f"{prefix}.shared_expert.up_proj.weight": up,
                f"{prefix}.shared_expert.down_proj.weight": down})  # fmt: skip
    return {k: v.detach().contiguous() for k, v in out.items()}


@torch.no_grad()
def to_qwen2_moe(model: nn.Module) -> Qwen2MoeForCausalLM:
    """A Qwen2MoeForCausalLM (CPU, the source dtype) computing what the carved `model` computes."""
    check_source(model)
    moes = _moe_layers(model)
    for i, moe in moes.items():
        if moe is not None:
            check_moe(i, moe, model.config.hidden_act)
    config = build_config(model, moes)

    state = {}
    for name, t in model.state_dict().items():
        if ".mlp." not in name:  # attention, norms, embeddings: same names in all four families
            state[name] = t.detach()
    for i, moe in moes.items():
        prefix = f"model.layers.{i}.mlp"
        if moe is None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{prefix}.{proj}.weight"] = model.get_submodule(f"{prefix}.{proj}").weight.detach()
        else:
            state.update(moe_tensors(moe, prefix, config.hidden_size))

    with torch.device("meta"):
        out = Qwen2MoeForCausalLM(config)
    expected = out.state_dict()
    dt = next(model.parameters()).dtype
    for name, t in expected.items():
        if name not in state and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros(t.shape, dtype=dt)  # the source has no q/k/v bias
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = set(expected) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto Qwen2-MoE: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ExportError(f"{name}: shape {tuple(t.shape)} where Qwen2-MoE expects {tuple(expected[name].shape)}")
    out.load_state_dict({k: v.to("cpu", dt).clone() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    out.model.rotary_emb = type(out.model.rotary_emb)(config)  # its non-persistent buffers were on meta
    left = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"internal: tensors left unset in the exported model: {left[:5]}")
    out.generation_config = model.generation_config
    return out.eval()
