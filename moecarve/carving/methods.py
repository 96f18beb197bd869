"""Carving recipes: one dense FFN + its calibration inputs -> one CarvedMoE.

`carve_ffn` composes statistics -> grouping -> router -> module. It knows nothing of decoder
layers or model families: `moecarve.carve` feeds it one FFN at a time.

Methods:
  "cmoe"    the paper: marker statistics, balanced k-means on markers, analytic router.
  "fitted"  |h|-profile grouping (profile_grouping), a router that tracks the oracle (the 4-bit
            shadow router by default, else a probe router fitted in closed form: fitted_router),
            and a ridge refit of down_proj on the routed activations (reconstruct).
            Training-free: closed-form solves on the calibration tokens.
A = 0 (static width pruning, `carve_ffn_static`): the N_s * m neurons the method ranks highest
(activation rate for "cmoe", mean |h| for "fitted") as one dense MLP, down_proj refitted where the
method refits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..config import CarveConfig
from ..errors import MoecarveError
from ..modules.condensed import CondensedMLP, CondensedSpec
from ..modules.moe import ROUTERS, CarvedMoE, MoESpec, pack_nibbles, packs_nibbles, quantize_rows, rounding_bias
from .ffn import DenseFFN
from .fitted_router import fit_router
from .grouping import Grouping, group_neurons
from .kth import kth_largest
from .oracle import expert_mass, oracle_indices, router_recall
from .profile_grouping import group_by_profiles, mean_mass
from .reconstruct import CHUNK, Selection, chunk_tokens, refit_down
from .router import analytic_router, router_load
from .stats import activation_markers, activation_rates, rate_histogram
from .tail import Tail, fit_tail


class CarveError(MoecarveError, RuntimeError):
    """Carving could not proceed (bad activations, impossible configuration)."""


@dataclass
class LayerReport:
    """What carving one layer measured."""

    layer: int
    seconds: float
    expert_size: int
    n_tokens: int
    rate_histogram: dict  # histogram of the per-neuron `statistic`
    shared_rate: float  # mean `statistic` of the shared neurons
    routed_rate: float  # mean `statistic` of the routed neurons
    load: list[int] = field(default_factory=list)  # calibration tokens per routed expert
    # "fitted" only (None for "cmoe"):
    router_recall: float | None = None  # overlap of the router's top-A with the oracle's, calibration tokens
    refit_error: list[float] | None = None  # relative output error on held-out tokens [before, after] the refit
    # what rate_histogram / shared_rate / routed_rate measure: "activation rate" (cmoe: how often a
    # neuron is among a token's top-K_a) or "mean |h|" (fitted: mean activation magnitude)
    statistic: str = "activation rate"
    router: str = ""  # the router kind the carved module uses (analytic, linear, shadow, fitted)
    # what this layer keeps per token (set by moecarve.carve.carve_layer; 0 in reports written before):
    n_active: int = 0  # routed experts active per token (A_l; the calibrated mean for "threshold")
    active_fraction: float = 0.0  # FFN neurons active per token / intermediate size (shared included)
    bytes_per_token: int = 0  # FFN bytes read per decoded token: active experts, shared, router, biases
    dense_bytes: int = 0  # the dense FFN's bytes (gate, up, down and biases), in the same dtype

    @property
    def load_imbalance(self) -> float:
        """max / mean of the routed experts' load (1.0 is perfectly balanced)."""
        if not self.load or sum(self.load) == 0:
            return float("nan")
        return max(self.load) / (sum(self.load) / len(self.load))


def moe_spec(ffn: DenseFFN, cfg: CarveConfig) -> MoESpec:
    return MoESpec(
        hidden_size=ffn.hidden_size,
        expert_size=cfg.expert_size(ffn.intermediate_size),
        n_shared=cfg.n_shared,
        n_routed=cfg.n_routed,
        top_k=cfg.n_active,
        act=ffn.act,
        gated=ffn.gated,
        in_bias=ffn.has_in_bias,
        out_bias=ffn.down_bias is not None,
        router=cfg.router,
        norm_topk_prob=cfg.router == "linear",  # the fitted linear router's weights assume it
    )


def _copy_in_rows(dest: torch.Tensor, ffn: DenseFFN, idx: torch.Tensor) -> None:
    """dest [..., 2m, d] (gate rows first) or [..., m, d] <- the input-projection rows of neurons
    idx [..., m] (one expert [m], or a block of experts [c, m]).

    Written into dest's halves directly: no [2m, d] temporary for a torch.cat.
    """
    if ffn.gated:
        m = idx.shape[-1]
        dest[..., :m, :].copy_(ffn.gate[idx])
        dest[..., m:, :].copy_(ffn.up[idx])
    else:
        dest.copy_(ffn.up[idx])


# Neurons copied per block when the experts' rows are assembled (build_moe, shadow_router): whole
# blocks of small experts at once instead of one Python step per expert (1536 steps per layer for
# single neurons), while a block's temporaries stay at BLOCK_NEURONS rows of d.
BLOCK_NEURONS = 256


def _expert_blocks(groups: torch.Tensor) -> list[slice]:
    """Slices of the experts groups [E, m] holding about BLOCK_NEURONS neurons each (at least one expert)."""
    per = max(1, BLOCK_NEURONS // groups.shape[1])
    return [slice(e, min(e + per, groups.shape[0])) for e in range(0, groups.shape[0], per)]


def _with_bias(ffn: DenseFFN, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The FFN's output bias plus a refit's fitted bias [d] (None: the FFN's own, possibly None)."""
    if bias is None:
        return ffn.down_bias
    own = ffn.down_bias.float() if ffn.down_bias is not None else 0.0
    return (own + bias).to(ffn.down.dtype)


def _in_bias(ffn: DenseFFN, idx: torch.Tensor) -> torch.Tensor:
    def part(b):
        return torch.zeros(idx.shape, dtype=ffn.up.dtype, device=ffn.up.device) if b is None else b[idx]

    return torch.cat([part(ffn.gate_bias), part(ffn.up_bias)], dim=-1) if ffn.gated else part(ffn.up_bias)


@torch.no_grad()
def build_router(spec: MoESpec, tensors: dict[str, torch.Tensor | None], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The router module of `spec` holding `tensors` (scale and bias start at zero, a shadow
    router's threshold at +inf)."""
    with torch.device("meta"):
        router = ROUTERS[spec.router](spec)
    router = router.to(dtype).to_empty(device=device)  # uninitialised: every tensor is set below
    router.scale.zero_()
    router.bias.zero_()
    if getattr(router, "threshold", None) is not None:
        router.threshold.fill_(float("inf"))  # top-A until calibrated
    for name, value in tensors.items():
        if value is not None:
            getattr(router, name).copy_(value)
    return router


@torch.no_grad()
def build_moe(
    ffn: DenseFFN, grouping: Grouping, spec: MoESpec, router: dict[str, torch.Tensor | None] | nn.Module,
    tail: Tail | None = None,
) -> CarvedMoE:
    """Assemble a CarvedMoE from slices of the dense weights: no weight is changed, only moved.

    router: its tensors (see build_router) or the router module itself; tail: the tail's tensors
    where spec.tail_neurons > 0 (carving.tail.fit_tail). Copied a block of experts
    at a time, so besides the carved module (as large as the dense FFN) only about BLOCK_NEURONS
    rows of d exist as temporaries at once.
    """
    dev, dt = ffn.up.device, ffn.up.dtype
    with torch.device("meta"):
        moe = CarvedMoE(spec)
    moe.router = router if isinstance(router, nn.Module) else build_router(spec, router, dev, dt)
    for part in (moe.experts, moe.shared):  # allocated once, directly in the compute dtype
        if part is not None:
            part.to(dt).to_empty(device=dev)
    if moe.out_bias is not None:
        moe.out_bias = nn.Parameter(torch.empty(spec.hidden_size, dtype=dt, device=dev))
    groups = grouping.experts.to(dev)  # [E, m]
    for b in _expert_blocks(groups):
        _copy_in_rows(moe.experts.in_proj[b], ffn, groups[b])  # [c, 2m, d]
        moe.experts.out_proj[b].copy_(ffn.down[:, groups[b]].permute(1, 0, 2))  # [d, c, m] -> [c, d, m]
    if moe.experts.in_bias is not None:
        moe.experts.in_bias.copy_(_in_bias(ffn, groups))
    if moe.shared is not None:
        shared = grouping.shared.to(dev)
        _copy_in_rows(moe.shared.in_proj, ffn, shared)
        moe.shared.out_proj.copy_(ffn.down[:, shared])
        if moe.shared.in_bias is not None:
            moe.shared.in_bias.copy_(_in_bias(ffn, shared))
    if moe.out_bias is not None:
        moe.out_bias.copy_(ffn.down_bias)
    if moe.tail is not None:
        if tail is None:
            raise CarveError("the spec asks for a tail (tail_neurons > 0) but no tail was fitted")
        moe.tail.to_empty(device=dev)
        moe.tail.codes.copy_(tail.codes)
        moe.tail.scale.data = tail.scale.float().to(dev)
        moe.tail.threshold.fill_(tail.threshold)
    return moe


def shadow_router(
    ffn: DenseFFN, grouping: Grouping, bits: int, pack: bool = True, weight: torch.Tensor | None = None,
    importance: torch.Tensor | None = None, input_mean: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """The shadow router's tensors: the routed experts' input rows [E, 2m, d] quantised per row to
    `bits`, packed as modules.moe.ShadowRouter stores them (two codes per byte at <= 4 bits; with
    pack=False the codes stay int8 [E, 2m, d], the "int8" layout, which scores identically).

    weight [I] (gated FFNs): each neuron's output weight (score_weights), folded into its up row's
    scale and bias and kept as `out_weight` [E, m]. importance [d]: the calibration inputs' mean
    square per dimension, which the rows' clipped steps are chosen by (quantize_rows). input_mean [d]:
    the calibration inputs' mean; each row's estimate is then corrected by its quantisation error on
    it, in_bias += (w - w~) . input_mean (MoESpec.shadow_bias), and input_mean is kept."""
    groups = grouping.experts.to(ffn.up.device)  # [E, m]
    E, m = groups.shape
    packed = pack and packs_nibbles(bits, ffn.hidden_size)
    n_rows = 2 * m if ffn.gated else m
    width = ffn.hidden_size // 2 if packed else ffn.hidden_size
    codes = torch.empty(E, n_rows, width, dtype=torch.uint8 if packed else torch.int8, device=ffn.up.device)
    row_scale = torch.empty(E, n_rows, device=ffn.up.device)  # [E, 2m]
    in_bias = _in_bias(ffn, groups).float() if ffn.has_in_bias else None  # [E, 2m]
    if input_mean is not None:
        mean = input_mean.float().to(ffn.up.device)
        in_bias = torch.zeros_like(row_scale) if in_bias is None else in_bias
    for b in _expert_blocks(groups):  # a block of experts at a time: no [E, 2m, d] float temporary
        rows = torch.empty(b.stop - b.start, n_rows, ffn.hidden_size, dtype=ffn.up.dtype, device=ffn.up.device)
        _copy_in_rows(rows, ffn, groups[b])
        q, row_scale[b] = quantize_rows(rows, bits, importance)
        if input_mean is not None:
            in_bias[b] += rounding_bias(rows, q, row_scale[b], mean)
        codes[b] = pack_nibbles(q) if packed else q
    extra = {} if input_mean is None else {"input_mean": mean}
    if weight is None:
        return {"codes": codes, "row_scale": row_scale, "in_bias": in_bias, **extra}
    out_weight = weight.to(row_scale)[groups]  # [E, m]
    row_scale[:, m:] *= out_weight  # the up rows: w * act(g) * u = act(g) * (w * u)
    if in_bias is not None:
        in_bias[:, m:] *= out_weight
    return {"codes": codes, "row_scale": row_scale, "in_bias": in_bias, "out_weight": out_weight, **extra}


def score_weights(ffn: DenseFFN, how: str, fisher: torch.Tensor | None = None) -> torch.Tensor | None:
    """Each neuron's output weight [I] float32 for the shadow router's scores (CarveConfig.score_weight):
    "fisher" sqrt(sum_k F_k down_ki^2) with fisher F [d] (None: as "down"), "down" ||down[:, i]||,
    "none" None. Dropping neuron i costs about (h_i w_i)^2 in the loss's second-order term, so the
    picks by w |h| keep what the output needs rather than the largest activations."""
    if how == "none" or not ffn.gated:  # plain MLPs: act(h) is not linear in a row scale
        return None
    d2 = ffn.down.float().pow(2)  # [d, I]
    if how == "fisher" and fisher is not None:
        d2 = d2 * fisher.to(d2).unsqueeze(1)
    w = d2.sum(dim=0).sqrt_()
    return w / w.mean().clamp_min(1e-30)  # mean 1: the scores keep their scale


@torch.no_grad()
def carve_ffn(
    ffn: DenseFFN, x: torch.Tensor, cfg: CarveConfig, layer: int = 0, *, outputs: bool = False, fisher: torch.Tensor | None = None
) -> tuple:
    """Carve one FFN on its calibration inputs x [T, d] (CMoE steps 3-8, or the "fitted" method).

    fisher [d]: the mean squared loss gradient w.r.t. the FFN's outputs (score_weight "fisher").

    Returns (carved module, LayerReport); with outputs=True, (module, report, y), y [T, d] the
    carved module's output on x where the method has it at hand (the "fitted" routed carve: the
    kept activations times the final down_proj, what the module computes up to float rounding),
    else None. moecarve.carve replays y instead of running the carved module on x again.
    """
    t0 = time.perf_counter()
    if not torch.isfinite(x).all():
        raise CarveError(f"layer {layer}: the FFN inputs contain NaN or Inf; cannot measure activations")
    if cfg.static:
        out = carve_ffn_static(ffn, x, cfg, layer, t0)
        return (*out, None) if outputs else out
    if cfg.method == "fitted":
        return carve_ffn_fitted(ffn, x, cfg, layer, t0, outputs=outputs, fisher=fisher)
    spec = moe_spec(ffn, cfg)
    markers = activation_markers(ffn, x, cfg.k_act)  # [T, I]
    rates = activation_rates(markers)  # [I]
    grouping = group_neurons(markers, rates, cfg.n_shared, cfg.n_routed, cfg.kmeans_iters)
    if cfg.router == "analytic":
        router = analytic_router(ffn, grouping.representatives)
    else:
        from .linear_router import fit_linear_router  # the export issue's router

        router = fit_linear_router(ffn, grouping, x, spec)
    moe = build_moe(ffn, grouping, spec, router)
    _, idx = moe.router(x.to(ffn.up.dtype))
    rates_cpu = rates.cpu()
    report = LayerReport(
        layer=layer,
        seconds=time.perf_counter() - t0,
        expert_size=spec.expert_size,
        n_tokens=x.shape[0],
        rate_histogram=rate_histogram(rates_cpu),
        shared_rate=float(rates_cpu[grouping.shared].mean()) if grouping.shared.numel() else 0.0,
        routed_rate=float(rates_cpu[grouping.experts.reshape(-1)].mean()),
        load=router_load(idx, spec.n_routed).cpu().tolist(),
        router=spec.router,
    )
    return (moe, report, None) if outputs else (moe, report)


# Calibration tokens scored per router call: [chunk, 2I] float32 temporaries of about 16 MiB
# (bigger chunks than reconstruct.CHUNK: the scoring runs once per layer over every token).
SCORE_ELEMENTS = 1 << 22
# Calibration tokens (evenly spaced) on which the report's router recall is measured: the oracle
# needs each token's [E] expert masses and a top-A, a diagnostic that need not cover every token.
RECALL_TOKENS = 1024


def score_chunk(intermediate_size: int) -> int:
    """Tokens per router call on the calibration inputs (at least reconstruct.CHUNK)."""
    return max(CHUNK, SCORE_ELEMENTS // (2 * intermediate_size))


@torch.no_grad()
def router_picks(
    router: nn.Module, x: torch.Tensor, chunk: int, calibrate: int | None = None, estimates: list | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a shadow or probe router picks on x [T, d], `chunk` tokens at a time: (idx [T, top_k],
    and for a threshold router kept [T, top_k], the slots above its threshold; else None). Each
    token's best pick comes first, the others in no particular order (the carve uses the picks as
    a set: an unsorted top-k is twice as fast as a sorted one at k = 2A).

    The routers' own rule (modules.moe.select_by_scores): the top-k of scores + bias, a slot kept
    when its score + bias exceeds the threshold; without the combine weights the carve does not
    use (every picked expert weighs 1 while the router's scale is 0).

    calibrate=A (threshold selection): first set router.threshold so that A slots per token are
    kept on average over x, counting the cap of top_k per token: the (T * A)-th largest of the
    tokens' top-k scores. One scoring pass serves both.

    estimates (a shadow router's carve with a tail): a list that receives each chunk's neuron
    estimates [t, E m] (ShadowRouter.estimates), what the scores are made of.
    """
    idx, values = [], []
    for s in range(0, x.shape[0], chunk):
        if estimates is None:
            v = router.logits(x[s : s + chunk]) + router.bias  # [t, E] float32
        else:
            est = router.estimates(x[s : s + chunk])  # [t, E, m]
            estimates.append(est.flatten(1))
            v = router.scores(est) + router.bias
        if router.top_k < v.shape[1]:
            v, i = torch.topk(v, router.top_k, dim=-1, sorted=False)
        else:  # every expert may be picked (threshold selection at A >= E / 2)
            i = torch.arange(v.shape[1], device=v.device).expand_as(v).clone()
        best = v.argmax(dim=1, keepdim=True)  # [t, 1]: swapped into slot 0
        i0, v0 = i.gather(1, best), v.gather(1, best)
        i.scatter_(1, best, i[:, :1].clone())
        v.scatter_(1, best, v[:, :1].clone())
        i[:, :1], v[:, :1] = i0, v0
        idx.append(i)
        values.append(v)
    idx, values = torch.cat(idx), torch.cat(values)  # [T, top_k]
    if getattr(router, "threshold", None) is None:
        return idx, None
    if calibrate is not None:
        flat = values.flatten()
        k = min(max(round(x.shape[0] * calibrate), 1), flat.numel())  # kept slots over all tokens
        router.threshold.fill_(kth_largest(flat, k) if k < flat.numel() else float("-inf"))
    return idx, values > router.threshold


@torch.no_grad()
def oracle_recall(
    h: torch.Tensor, experts: torch.Tensor, idx: torch.Tensor, n_active: int, weight: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> float:
    """How often the router's picks idx [T, A] include the oracle's top-`n_active` experts (by |h|
    mass, h [T, I], experts [E, m]; with weight [I], by the weighted mass the router scores), on at
    most RECALL_TOKENS evenly spaced tokens. kept [T, A] (threshold selection): only the slots it
    marks count; a slot below the threshold stands for the token's best pick, idx[:, 0]."""
    rows = torch.arange(0, h.shape[0], max(1, h.shape[0] // RECALL_TOKENS), device=h.device)[:RECALL_TOKENS]
    picks = idx[rows.to(idx.device)]  # [t, A]
    if kept is not None:
        picks = torch.where(kept[rows.to(kept.device)], picks, picks[:, :1])
    w = 1.0 if weight is None else weight.to(h.device)
    mass = torch.cat([expert_mass(h[r].abs() * w, experts) for r in rows.split(CHUNK)])  # [t, E]
    oracle = oracle_indices(mass, n_active)
    return router_recall(picks, oracle.to(idx.device), experts.shape[0])


@torch.no_grad()
def carve_ffn_fitted(
    ffn: DenseFFN, x: torch.Tensor, cfg: CarveConfig, layer: int = 0, t0: float | None = None, outputs: bool = False,
    fisher: torch.Tensor | None = None,
) -> tuple:
    """The "fitted" method on calibration inputs x [T, d]: profile grouping -> fitted router -> refit.

    Every step reads the dense activations h [T, I] of these inputs (the earlier layers already
    carved), so the refit targets the dense FFN output on what the carved model actually feeds it.
    Returns (module, report), or with outputs=True (module, report, y [T, d]): the module's output
    on x, (h * keep) down^T + b with the final down_proj (each picked expert weighs exactly 1: the
    router's scale starts at 0).
    """
    t0 = time.perf_counter() if t0 is None else t0
    spec = moe_spec(ffn, cfg)
    if not cfg.shadow_bits and cfg.probes_per_expert > spec.expert_size:  # probes only feed the probe router
        raise CarveError(f"probes_per_expert={cfg.probes_per_expert} exceeds the expert size {spec.expert_size}")
    xf = x.float()
    h = ffn.hidden_float(xf if ffn.up.dtype == torch.float32 else x)  # [T, I]
    grouping = group_by_profiles(h, cfg.n_shared, cfg.n_routed, cfg.profile_iters, cfg.seed)
    threshold = cfg.selection == "threshold"
    weight = None  # the neurons' score weights (shadow router)
    if cfg.shadow_bits:
        layout = "nibbles" if packs_nibbles(cfg.shadow_bits, ffn.hidden_size) else "int8"
        weight = score_weights(ffn, cfg.score_weight, fisher)  # [I] or None
        spec = replace(spec, router="shadow", shadow_bits=cfg.shadow_bits, shadow_layout=layout, selection=cfg.selection,
                       shadow_weighted=weight is not None, shadow_bias=cfg.shadow_bias)  # fmt: skip
        if threshold:  # up to 2A experts above the threshold, A on average
            spec = replace(spec, top_k=min(spec.n_routed, 2 * cfg.n_active), mean_active=float(cfg.n_active))
        # scored with unpacked int8 codes (the "int8" layout: the same integers, without unpacking
        # the nibbles again for every chunk of calibration tokens), packed once the picks are known
        mean = xf.mean(dim=0) if cfg.shadow_bias else None  # [d]
        importance = xf.pow(2).mean(dim=0)  # [d] E[x_j^2] of the calibration inputs
        tensors = shadow_router(ffn, grouping, cfg.shadow_bits, pack=False, weight=weight, importance=importance,
                                input_mean=mean)  # fmt: skip
        router = build_router(replace(spec, shadow_layout="int8"), tensors, ffn.up.device, ffn.up.dtype)
    else:
        spec = replace(spec, router="fitted", router_probes=cfg.probes_per_expert * spec.n_routed)
        tensors = fit_router(ffn, grouping, xf, h, cfg.n_active, cfg.probes_per_expert, cfg.holdout).tensors
        router = build_router(spec, tensors, ffn.up.device, ffn.up.dtype)
    # Token chunks bound every [T, ...] temporary below (a streamed carve's peak memory).
    xin = x.to(ffn.up.dtype)
    # the router's own picks [T, A] (threshold: calibrated on these tokens first, A per token on average)
    with_tail = cfg.tail > 0 and spec.router == "shadow"
    est = [] if with_tail else None  # the router's neuron estimates, which the tail is made from
    idx, kept = router_picks(router, xin, score_chunk(ffn.intermediate_size), cfg.n_active if threshold else None, est)
    # threshold selection: only the slots above the threshold count (a token may keep none of its A)
    selection = Selection(grouping.shared, grouping.experts, idx, kept)
    tail = None
    if with_tail:  # the neurons just below the cut, from the router's estimates
        neurons = grouping.experts.reshape(-1)  # [N] routed neurons in expert order
        tail = fit_tail(
            ffn, torch.cat(est), selection, neurons, round(cfg.tail * ffn.intermediate_size),
            out_weight=None if weight is None else weight[neurons.to(weight.device)],
            importance=fisher if fisher is not None else torch.ones(ffn.hidden_size),
        )
        del est
        selection.tail = tail.outputs
        spec = replace(spec, tail_neurons=tail.mean_neurons)
    if spec.router == "shadow" and spec.shadow_layout == "nibbles":  # the stored router: codes two per byte
        packed = build_router(spec, {**tensors, "codes": pack_nibbles(tensors["codes"])}, ffn.up.device, ffn.up.dtype)
        if threshold:
            packed.threshold.copy_(router.threshold)
        router = packed
    del tensors
    recall = oracle_recall(h, grouping.experts, idx, cfg.n_active, weight, kept)
    mean = mean_mass(h).cpu()  # [I] mean |h|, as group_by_profiles ranks the neurons
    refit_error = None
    if cfg.refit:
        refit = refit_down(h, selection, ffn.down, cfg.holdout, intercept=cfg.refit_bias)
        ffn = replace(ffn, down=refit.down.to(ffn.down.dtype), down_bias=_with_bias(ffn, refit.bias))
        spec = replace(spec, out_bias=ffn.down_bias is not None)
        refit_error = [refit.heldout_before, refit.heldout_after]
        del refit
    y = carved_outputs(h, selection, ffn) if outputs else None
    del h  # before build_moe allocates the carved weights
    moe = build_moe(ffn, grouping, spec, router, tail)
    report = LayerReport(
        layer=layer,
        seconds=time.perf_counter() - t0,
        expert_size=spec.expert_size,
        n_tokens=x.shape[0],
        rate_histogram=rate_histogram(mean),  # of mean |h| here: "fitted" measures no marker rates
        shared_rate=float(mean[grouping.shared].mean()) if grouping.shared.numel() else 0.0,
        routed_rate=float(mean[grouping.experts.reshape(-1)].mean()),
        load=router_load(idx, spec.n_routed, kept).cpu().tolist(),
        router_recall=recall,
        refit_error=refit_error,
        statistic="mean |h|",
        router=spec.router,
    )
    return (moe, report, y) if outputs else (moe, report)


@torch.no_grad()
def carved_outputs(h: torch.Tensor, selection: Selection, ffn: DenseFFN) -> torch.Tensor:
    """(h * keep) down^T + b_d [T, d] in ffn's dtype: a routed carve's output on the tokens of h [T, I]
    whose picks `selection` holds, with ffn's (refitted) down_proj, a token chunk at a time."""
    down = ffn.down.float()
    size = chunk_tokens(h.shape[1])
    y = torch.empty(h.shape[0], down.shape[0], dtype=ffn.down.dtype, device=h.device)
    for s in range(0, h.shape[0], size):
        rows = slice(s, min(s + size, h.shape[0]))
        yc = selection.kept(h, rows) @ down.t()
        if selection.tail is not None:
            yc += selection.tail[rows].to(yc)
        y[rows] = yc if ffn.down_bias is None else yc + ffn.down_bias.float()
    return y


@torch.no_grad()
def carve_ffn_static(
    ffn: DenseFFN, x: torch.Tensor, cfg: CarveConfig, layer: int = 0, t0: float | None = None
) -> tuple[CondensedMLP, LayerReport]:
    """Static width pruning (A = 0) on calibration inputs x [T, d]: the N_s * m neurons ranked
    highest (cmoe: activation rate; fitted: mean |h|) as one dense MLP (a CondensedMLP), with
    "fitted"'s ridge refit of down_proj on the kept activations."""
    t0 = time.perf_counter() if t0 is None else t0
    m = cfg.expert_size(ffn.intermediate_size)
    if cfg.method == "fitted":
        h = ffn.hidden_float(x.float() if ffn.up.dtype == torch.float32 else x)  # [T, I]
        stat, name = mean_mass(h).cpu(), "mean |h|"
    else:
        h, stat, name = None, activation_rates(activation_markers(ffn, x, cfg.k_act)).cpu(), "activation rate"
    kept = torch.argsort(stat, descending=True, stable=True)[: cfg.n_shared * m].sort().values  # [n]
    refit_error = None
    if h is not None and cfg.refit:
        none = Selection(kept, torch.empty(0, m, dtype=torch.long), torch.empty(x.shape[0], 0, dtype=torch.long))
        refit = refit_down(h, none, ffn.down, cfg.holdout, intercept=cfg.refit_bias)
        ffn = replace(ffn, down=refit.down.to(ffn.down.dtype), down_bias=_with_bias(ffn, refit.bias))
        refit_error = [refit.heldout_before, refit.heldout_after]
    del h
    spec = CondensedSpec(
        hidden_size=ffn.hidden_size, intermediate_size=kept.numel(), act=ffn.act, gated=ffn.gated,
        in_bias=ffn.has_in_bias, out_bias=ffn.down_bias is not None,
    )  # fmt: skip
    dev, dt = ffn.up.device, ffn.up.dtype
    with torch.device("meta"):
        mlp = CondensedMLP(spec)
    mlp = mlp.to(dt).to_empty(device=dev)
    idx = kept.to(dev)
    _copy_in_rows(mlp.in_proj, ffn, idx)
    mlp.out_proj.copy_(ffn.down[:, idx])
    if mlp.in_bias is not None:
        mlp.in_bias.copy_(_in_bias(ffn, idx))
    if mlp.out_bias is not None:
        mlp.out_bias.copy_(ffn.down_bias)
    report = LayerReport(
        layer=layer, seconds=time.perf_counter() - t0, expert_size=m, n_tokens=x.shape[0],
        rate_histogram=rate_histogram(stat), shared_rate=float(stat[kept].mean()), routed_rate=0.0,
        refit_error=refit_error, statistic=name, router="none",
    )  # fmt: skip
    return mlp, report
