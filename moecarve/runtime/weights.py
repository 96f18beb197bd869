"""A loaded model (dense or carved, any family of runtime/arch.py) -> the runtime's description:
every matrix packed for the chosen precision (runtime/pack.py), norms, biases and router tables as
float32, and the ctypes structures of runtime/csrc/rt.h pointing at them.

`Weights` owns every tensor the description points to; the C side reads them in place for as long
as the Weights object lives. Packing reads the model once and copies what it needs, so the
model itself may be freed afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import adapters
from ..kernels.native import ACTS
from ..modules.hf import source_model_type
from . import native as N
from .arch import Decoder, UnsupportedModel, decoder_for
from .pack import PRECISIONS, interleave_gated, interleave_gated_bias, pack_panels, pack_rows, row_bytes


def _get(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


@dataclass
class Weights:
    """The packed model: `desc` (a ctypes Desc) and everything it points to."""

    desc: N.Desc
    precision: str
    model_type: str
    keep: list = field(default_factory=list, repr=False)  # tensors and ctypes arrays the C side reads
    notes: list[str] = field(default_factory=list)  # what the runtime adapted (a context clamp, ...)
    bytes_per_token: dict[str, int] = field(default_factory=dict)  # weight bytes a decode step reads, by part

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """A pointer to t's data for C (None for None); t is kept alive with the weights."""
        if t is None:
            return None
        t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def f32(self, t: torch.Tensor | None) -> int | None:
        return None if t is None else self.ptr(t.detach().float().contiguous())

    def mat(self, w: torch.Tensor, layout: int) -> N.Mat:
        """w [N, K] packed as panels or rows in this precision."""
        prec = PRECISIONS[self.precision]
        data, scales = (pack_panels if layout == N.PANEL else pack_rows)(w, prec)
        return N.Mat(self.ptr(data), self.ptr(scales), w.shape[0], w.shape[1], prec, layout)


def _mat_bytes(m: N.Mat, rows: float | None = None) -> int:
    """Bytes of m a product reads (all its rows, or `rows` of them)."""
    per = {N.F32: 4.0, N.BF16: 2.0, N.I8: 1.0 + 2.0 / N.BLOCK}[m.dtype]
    if m.layout == N.ROWS and m.dtype == N.I8:  # codes and scales padded to 64 bytes per row
        return int((m.rows if rows is None else rows) * row_bytes(m.cols))
    return int((m.rows if rows is None else rows) * m.cols * per)


def norm_eps(mod: nn.Module, default: float | None = None) -> float:
    """A norm module's epsilon, whatever the family calls it (`default` where it keeps none)."""
    for key in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(mod, key, None)
        if isinstance(v, (int, float)):
            return float(v)
    if default is not None:
        return default
    raise UnsupportedModel(f"the decode runtime found no epsilon on {type(mod).__name__}")


def _norm(w: Weights, mod: nn.Module | None, dec: Decoder, size: int) -> N.Norm:
    """A norm's weight (ones for a norm without one, OLMo's; Gemma's (1 + w) folded in), bias, eps."""
    if mod is None:
        return N.Norm(None, None, 0.0)
    weight = getattr(mod, "weight", None)
    weight = torch.ones(size) if weight is None else weight.detach().float() + (1.0 if dec.norm_offset else 0.0)
    return N.Norm(w.f32(weight), w.f32(getattr(mod, "bias", None)), norm_eps(mod, dec.eps))


def _linear(mod: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = mod.weight.detach()
    return (weight.t() if conv1d else weight), (None if getattr(mod, "bias", None) is None else mod.bias.detach())


def _act(name: str) -> int:
    if name not in ACTS:
        raise UnsupportedModel(f"the decode runtime has no activation {name!r} (it has {', '.join(sorted(ACTS))})")
    return ACTS[name]


def _dense(w: Weights, gate, up, down, gate_b, up_b, down_b, gated: bool) -> N.Dense:
    """A dense MLP: gate/up [n, d] (plain: up only), down [d, n]."""
    if gated:
        in_w = interleave_gated(gate, up)
        in_b = None if gate_b is None else interleave_gated_bias(gate_b, up_b)
    else:
        in_w, in_b = up, up_b
    return N.Dense(w.mat(in_w, N.PANEL), w.mat(down, N.PANEL), w.f32(in_b), w.f32(down_b), down.shape[1])


def every_expert(mod: nn.Module) -> tuple | None:
    """A carved layer with every expert picked, as one dense MLP (gate, up, down, gate bias, up bias)
    over its shared and routed neurons, or None where picking every expert is not that MLP (a
    router whose combine weights are not all 1: the linear router, a trained combine scale)."""
    spec, ex, r = mod.spec, mod.experts, mod.router
    if spec.router == "linear" or bool((r.scale.detach() != 0).any()):
        return None
    E, m, d = spec.n_routed, spec.expert_size, spec.hidden_size
    inp = ex.in_proj.detach().view(E, -1, m, d)  # [E, 2 or 1, m, d]
    down = ex.out_proj.detach().permute(1, 0, 2).reshape(d, E * m)  # column e*m + j = out_proj[e][:, j]
    bias = None if ex.in_bias is None else ex.in_bias.detach().view(E, -1, m)
    parts = [[inp[:, k].reshape(E * m, d) for k in range(inp.shape[1])], [down],
             [None if bias is None else bias[:, k].reshape(-1) for k in range(inp.shape[1])]]  # fmt: skip
    if mod.shared is not None:  # the shared neurons first
        sh, n = mod.shared, mod.shared.out_proj.shape[1]
        si = sh.in_proj.detach().view(-1, n, d)
        sb = None if sh.in_bias is None else sh.in_bias.detach().view(-1, n)
        parts[0] = [torch.cat([si[k], parts[0][k]]) for k in range(si.shape[0])]
        parts[1] = [torch.cat([sh.out_proj.detach(), down], dim=1)]
        if (sb is None) != (bias is None):
            return None
        if sb is not None:
            parts[2] = [torch.cat([sb[k], parts[2][k]]) for k in range(sb.shape[0])]
    if spec.gated:
        (gate, up), (down,), (gb, ub) = parts
    else:
        (up,), (down,), (ub,) = parts
        gate = gb = None
    return gate, up, down, gb, ub


def _moe(w: Weights, mod: nn.Module, L: N.Layer, all_experts: bool) -> float:
    """Fills L.moe from a CarvedMoE (with `all_experts`, also its every-expert dense MLP); returns the
    routed neurons a token reads on average."""
    spec, ex, r = mod.spec, mod.experts, mod.router
    E, m, A, d = spec.n_routed, spec.expert_size, spec.top_k, spec.hidden_size
    M = L.moe
    M.E, M.m, M.A = E, m, A
    # each neuron's rows together: gate, up, output column (rt.h), [E, m, P, d] -> [E * m * P, d]
    inp = ex.in_proj.detach().view(E, -1, m, d)  # [E, 2, m, d] gated (gate rows, then up rows) or [E, 1, m, d]
    parts = [inp[:, k] for k in range(inp.shape[1])] + [ex.out_proj.detach().transpose(1, 2)]
    M.per = len(parts)
    M.neurons = w.mat(torch.stack(parts, dim=2).reshape(-1, d), N.ROWS)
    if ex.in_bias is not None:
        b = ex.in_bias.detach().float().view(E, -1, m).transpose(1, 2)  # [E, m, 2 or 1]
        M.bias = w.f32(torch.nn.functional.pad(b, (0, 2 - b.shape[-1])).reshape(-1))
    if mod.shared is not None:
        sh = mod.shared
        n = sh.out_proj.shape[1]
        gi = sh.in_proj.detach()
        b = None if sh.in_bias is None else sh.in_bias.detach()
        if spec.gated:
            M.shared = _dense(w, gi[:n], gi[n:], sh.out_proj, None if b is None else b[:n], None if b is None else b[n:],
                              None, True)  # fmt: skip
        else:
            M.shared = _dense(w, None, gi, sh.out_proj, None, b, None, False)
    M.out_bias = w.f32(mod.out_bias)
    M.r_bias, M.r_scale = w.f32(r.bias), w.f32(r.scale)
    M.threshold = math.inf
    kind = spec.router
    if kind == "shadow":
        M.router, M.rank_softmax, M.weight_mode = N.ROUTER_SHADOW, 0, 0
        M.sh_codes = w.ptr(r.codes.detach())
        M.sh_bits = 4 if r.codes.dtype == torch.uint8 else 8
        M.sh_scale, M.sh_bias = w.f32(r.row_scale), w.f32(r.in_bias)
        if getattr(r, "threshold", None) is not None:
            M.threshold = float(r.threshold)
        tail = getattr(mod, "tail", None)
        if tail is not None:
            M.tail_codes, M.tail_scale = w.ptr(tail.codes.detach().contiguous()), w.f32(tail.scale)
            M.tail_threshold = float(tail.threshold)
            per = tail.codes.shape[1] + 4  # a column's codes and its step
            w.bytes_per_token["tail"] = w.bytes_per_token.get("tail", 0) + round(spec.tail_neurons * per)
    elif kind == "analytic":
        M.router, M.rank_softmax, M.weight_mode = N.ROUTER_ANALYTIC, 1, 0
        M.r_w = w.f32(r.gate if r.up is None else torch.cat([r.gate.detach(), r.up.detach()]))
    elif kind == "linear":
        M.router, M.rank_softmax, M.weight_mode = N.ROUTER_LINEAR, 1, 2 if r.norm_topk_prob else 1
        M.r_w = w.f32(r.weight)
    elif kind == "fitted":
        M.router, M.rank_softmax, M.weight_mode = N.ROUTER_FITTED, 0, 0
        M.r_w, M.r_b = w.f32(r.weight), w.f32(r.score_bias)
        M.probe_w, M.probe_b, M.probes = w.f32(r.probe), w.f32(r.probe_bias), spec.router_probes
    else:
        raise UnsupportedModel(f"the decode runtime has no router {kind!r}")
    dense = every_expert(mod) if all_experts else None
    if dense is not None:
        gate, up, down, gb, ub = dense
        M.all = _dense(w, gate, up, down, gb, ub, None, spec.gated)
    active = spec.mean_active or A
    routed_bytes = _mat_bytes(M.neurons, active * m * M.per)
    shared_bytes = _mat_bytes(M.shared.in_w) + _mat_bytes(M.shared.out_w) if mod.shared is not None else 0
    router_bytes = int(r.codes.numel() * r.codes.element_size()) if kind == "shadow" else 0
    w.bytes_per_token["ffn"] = w.bytes_per_token.get("ffn", 0) + routed_bytes + shared_bytes
    w.bytes_per_token["router"] = w.bytes_per_token.get("router", 0) + router_bytes
    return active * m


def _ffn(w: Weights, config, layer: nn.Module, L: N.Layer, all_experts: bool) -> None:
    mod = adapters.ffn_input_module(config, layer)
    name = type(mod).__name__
    if name == "CarvedMoE":
        L.ffn_kind, L.gated, L.act = N.FFN_MOE, int(mod.spec.gated), _act(mod.spec.act)
        _moe(w, mod, L, all_experts)
        return
    if name == "CondensedMLP":
        spec = mod.spec
        if spec.gated_neurons:
            raise UnsupportedModel("the decode runtime cannot run a condensed layer with a shared-expert gate (Qwen2-MoE)")
        n, gi = spec.intermediate_size, mod.in_proj.detach()
        b = None if mod.in_bias is None else mod.in_bias.detach()
        L.ffn_kind, L.gated, L.act = N.FFN_DENSE, int(spec.gated), _act(spec.act)
        if spec.gated:
            L.dense = _dense(w, gi[:n], gi[n:], mod.out_proj, None if b is None else b[:n], None if b is None else b[n:],
                             mod.out_bias, True)  # fmt: skip
        else:
            L.dense = _dense(w, None, gi, mod.out_proj, None, b, mod.out_bias, False)
    else:
        f = adapters.read_ffn(config, layer)
        L.ffn_kind, L.gated, L.act = N.FFN_DENSE, int(f.gated), _act(f.act)
        L.dense = _dense(w, f.gate, f.up, f.down, f.gate_bias, f.up_bias, f.down_bias, f.gated)
    w.bytes_per_token["ffn"] = w.bytes_per_token.get("ffn", 0) + _mat_bytes(L.dense.in_w) + _mat_bytes(L.dense.out_w)


def _rotary(model: nn.Module) -> nn.Module | None:
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and (hasattr(mod, "inv_freq") or any(k.endswith("_inv_freq") for k in dir(mod))):
            return mod
    return None


def _rope(decoder: nn.Module, config, layer_type: str | None) -> tuple[torch.Tensor | None, float, str | None]:
    """(inv_freq [rot/2], attention scaling, rope type) of a layer, or (None, 1, None) without RoPE."""
    rot = _rotary(decoder)
    if rot is None:
        return None, 1.0, None
    inv = getattr(rot, f"{layer_type}_inv_freq", None) if layer_type else None
    inv = inv if inv is not None else getattr(rot, "inv_freq", None)
    if inv is None:
        raise UnsupportedModel(f"the decode runtime found no RoPE frequencies in {type(rot).__name__}")
    scale = getattr(rot, f"{layer_type}_attention_scaling", None) if layer_type else None
    scale = scale if scale is not None else getattr(rot, "attention_scaling", 1.0)
    kind = getattr(rot, "rope_type", "default")
    kind = kind.get(layer_type, "default") if isinstance(kind, dict) else kind
    return inv.detach().float(), float(scale), kind


def _context_limit(config, rope_kinds: set[str], max_ctx: int | None, notes: list[str]) -> int:
    """The cache length: asked for, within the model's positions (and the original length for RoPE
    variants that change their frequencies past it)."""
    limit = adapters.max_positions(config) or 2048
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and rope_kinds & {"dynamic", "longrope"}:
        orig = params.get("original_max_position_embeddings") or limit
        if orig < limit:
            notes.append(f"context limited to {orig} positions ({'/'.join(sorted(rope_kinds))} RoPE changes past it)")
            limit = orig
    if max_ctx is None:
        return min(limit, 4096)
    if max_ctx > limit:
        raise UnsupportedModel(f"a context of {max_ctx} positions is beyond this model's {limit}")
    return max_ctx


def load_weights(model: nn.Module, precision: str = "bf16", max_ctx: int | None = None, max_slots: int = 1,
                 max_tokens: int = 256, all_experts: bool = False) -> Weights:  # fmt: skip
    """Pack `model` (a transformers causal LM, dense or carved, on CPU) for the runtime; with
    `all_experts`, carved layers also as a dense MLP of every expert (every_expert)."""
    if precision not in PRECISIONS:
        raise UnsupportedModel(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    model_type = source_model_type(model.config.model_type)
    config = model.config.get_text_config()  # a multimodal model's language half (Gemma 3)
    dec: Decoder = decoder_for(model_type, config)
    w = Weights(N.Desc(), precision, model_type)
    D = w.desc
    layers = adapters.decoder_layers(model)
    d, H = config.hidden_size, config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    layer_types = getattr(config, "layer_types", None)
    window = (getattr(config, "sliding_window", None) or 0) if getattr(config, "use_sliding_window", True) else 0
    decoder = _get(model, dec.prefix)

    embed = _get(decoder, dec.embed).weight.detach()
    lm = model.get_output_embeddings()
    lm_w = lm.weight.detach()
    D.lm_head = w.mat(lm_w, N.PANEL)
    D.lm_bias = w.f32(getattr(lm, "bias", None))
    tied = lm_w.data_ptr() == embed.data_ptr() and lm_w.shape == embed.shape
    D.embed = D.lm_head if tied else w.mat(embed, N.ROWS)
    if dec.pos_embed:
        D.pos_embed = w.mat(_get(decoder, dec.pos_embed).weight.detach(), N.ROWS)
        D.pos_offset = dec.pos_offset
    D.final_norm = _norm(w, _get(decoder, dec.final_norm), dec, d)
    D.rope_interleaved = int(dec.rope_interleaved)

    scales = dec.scales(config)
    dt = embed.dtype  # the model rounds its embedding scale to its own dtype (Gemma)
    D.embed_scale = torch.tensor(scales.get("embed", 1.0), dtype=dt).item() if "embed" in scales else 1.0
    D.residual_scale = scales.get("residual", 1.0)
    D.attn_scale = scales.get("attn", hd**-0.5)
    D.attn_softcap, D.final_softcap = scales.get("attn_softcap", 0.0), scales.get("final_softcap", 0.0)
    D.logit_scale = scales.get("logit", 1.0)
    D.norm_kind = N.NORM_RMS if dec.norm == "rms" else N.NORM_LAYER
    D.norm_eps = D.final_norm.eps

    arr = (N.Layer * len(layers))()
    w.keep.append(arr)
    rope_kinds: set[str] = set()
    attn_bytes = 0
    for i, layer in enumerate(layers):
        L = arr[i]
        a = _get(layer, dec.attn)
        pre_a, post_a, pre_f, post_f = (None if n is None else getattr(layer, n) for n in dec.norms)
        L.in_norm, L.post_attn_norm = _norm(w, pre_a, dec, d), _norm(w, post_a, dec, d)
        L.ffn_norm, L.post_ffn_norm = _norm(w, pre_f, dec, d), _norm(w, post_f, dec, d)
        L.parallel = int(dec.parallel(config))
        if dec.qkv:
            wqkv, bqkv = _linear(getattr(a, dec.qkv), dec.conv1d)
        else:
            parts = [_linear(getattr(a, n), dec.conv1d) for n in (dec.q, dec.k, dec.v)]
            wqkv = torch.cat([p[0] for p in parts])
            bqkv = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        if wqkv.shape[0] != (H + 2 * Hkv) * hd:
            raise UnsupportedModel(f"layer {i}: q/k/v give {wqkv.shape[0]} outputs, expected {(H + 2 * Hkv) * hd}")
        L.wqkv, L.bqkv = w.mat(wqkv, N.PANEL), w.f32(bqkv)
        wo, bo = _linear(getattr(a, dec.o), dec.conv1d)
        L.wo, L.bo = w.mat(wo, N.PANEL), w.f32(bo)
        attn_bytes += _mat_bytes(L.wqkv) + _mat_bytes(L.wo)
        if dec.qk_norm:
            off = 1.0 if dec.norm_offset else 0.0
            qn, kn = (getattr(a, n) for n in dec.qk_names)
            L.q_norm, L.k_norm = w.f32(qn.weight.detach().float() + off), w.f32(kn.weight.detach().float() + off)
            L.qk_norm_full, L.qk_norm_after_rope, L.qk_eps = int(dec.qk_norm == "full"), int(dec.qk_after_rope), norm_eps(qn)
        layer_type = layer_types[i] if layer_types else None
        L.window = (window if layer_type == "sliding_attention" else 0) if layer_types else window
        inv, scale, kind = _rope(decoder, config, layer_type)
        if inv is not None and dec.rope_on(config, i, layer_type):
            L.inv_freq, L.rope_scale = w.f32(inv), scale
            D.rot = 2 * inv.numel()
            rope_kinds.add(kind)
        else:
            L.rope_scale = 1.0
        _ffn(w, config, layer, L, all_experts)

    D.n_layers, D.d, D.H, D.Hkv, D.hd, D.vocab = len(layers), d, H, Hkv, hd, lm_w.shape[0]
    D.max_ctx = _context_limit(config, rope_kinds, max_ctx, w.notes)
    D.max_slots, D.max_tokens = max_slots, max_tokens
    D.kv_dtype = N.F32 if precision == "fp32" else N.BF16
    D.layers = arr
    w.bytes_per_token["attention"] = attn_bytes
    w.bytes_per_token["lm_head"] = _mat_bytes(D.lm_head)
    return w
