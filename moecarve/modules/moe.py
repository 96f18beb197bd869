"""The carved MoE layer: shared experts + routed experts + a router.

This file imports only torch and transformers: it is copied verbatim into every carved folder's
`modeling_moecarve.py`, so a carved model loads with `trust_remote_code=True` without moecarve.

Shapes: T tokens, d hidden size, E routed experts, m neurons per expert, A experts per token.
A gated MLP (SwiGLU/GeGLU) keeps gate and up rows stacked as `in_proj` [E, 2m, d] (gate rows
first); a plain MLP (GPT-2, OPT) keeps `in_proj` [E, m, d]. `out_proj` is [E, d, m], the layout of
transformers' stacked MoE experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


@dataclass
class MoESpec:
    """Everything needed to build an (empty) CarvedMoE; stored in config.json."""

    hidden_size: int
    expert_size: int  # m
    n_shared: int  # N_s: shared experts, fused into one MLP of n_shared * m neurons
    n_routed: int  # E
    top_k: int  # A
    act: str  # a transformers ACT2FN name
    gated: bool = True
    in_bias: bool = False
    out_bias: bool = False
    router: str = "analytic"  # "analytic" | "linear" | "fitted" | "shadow"
    norm_topk_prob: bool = False  # linear router: renormalise the top-k probabilities
    router_probes: int = 0  # fitted router: probe neurons whose |h| feeds the scores
    shadow_bits: int = 0  # shadow router: bits of its quantised copy of the experts' input rows
    shadow_layout: str = "int8"  # shadow router codes: "nibbles" (two per byte) or "int8" (folders before packing)
    selection: str = "topk"  # shadow router: "topk" (top_k experts) or "threshold" (up to top_k above a threshold)
    mean_active: float = 0.0  # "threshold": routed experts picked per token on average (calibrated); else top_k
    shadow_weighted: bool = False  # shadow router: each up row's scale carries its neuron's output weight (out_weight)
    shadow_bias: bool = False  # shadow router: each row's estimate corrected by its quantisation error on the inputs' mean
    tail_neurons: float = 0.0  # shadow router: routed neurons per token in the tail (TailNeurons), on average; 0: no tail

    def to_dict(self) -> dict:
        return {"type": "moe", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MoESpec":
        d = {k: v for k, v in d.items() if k != "type"}
        return cls(**d)


def glu(h: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """act(gate) * up for gated MLPs (h = [gate | up] along the last dim), else act(h)."""
    if not gated:
        return act(h)
    g, u = h.chunk(2, dim=-1)
    return act(g) * u


class SharedExpert(nn.Module):
    """The N_s shared experts as one MLP of n = N_s * m neurons (always on, weight 1)."""

    def __init__(self, spec: MoESpec):
        super().__init__()
        n, d = spec.n_shared * spec.expert_size, spec.hidden_size
        rows = 2 * n if spec.gated else n
        self.gated = spec.gated
        self.in_proj = nn.Parameter(torch.empty(rows, d))  # [2n, d] gate rows then up rows
        self.out_proj = nn.Parameter(torch.empty(d, n))  # [d, n]
        self.in_bias = nn.Parameter(torch.empty(rows)) if spec.in_bias else None
        self.act = ACT2FN[spec.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, d]
        h = F.linear(x, self.in_proj, self.in_bias)
        h = glu(h, self.act, self.gated)
        return F.linear(h, self.out_proj)


class AnalyticRouter(nn.Module):
    """CMoE's training-free router built from one representative neuron per routed expert.

    score_e(x) = |(up_e . x) * act(gate_e . x)| with L2-normalised representative rows;
    probs = softmax(score) in float32; selected = top-A of (probs + bias);
    combine weight = 1 + probs_e * scale_e (scale starts at 0: every selected expert weighs 1).
    `bias` is the auxiliary-loss-free load-balancing bias, changed only while fine-tuning.
    """

    def __init__(self, spec: MoESpec):
        super().__init__()
        E, d = spec.n_routed, spec.hidden_size
        self.top_k = spec.top_k
        self.gate = nn.Parameter(torch.empty(E, d))  # [E, d] representative gate rows, normalised
        self.up = nn.Parameter(torch.empty(E, d)) if spec.gated else None  # [E, d]
        self.scale = nn.Parameter(torch.zeros(E))  # s, trainable, starts at 0
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))
        self.act = ACT2FN[spec.act]

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        s = self.act(F.linear(x, self.gate))
        if self.up is not None:
            s = s * F.linear(x, self.up)
        return s.abs().float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (weights [T, A] in x.dtype, indices [T, A] int64)."""
        probs = self.logits(x).softmax(dim=-1)  # [T, E] float32
        idx = torch.topk(probs + self.bias, self.top_k, dim=-1).indices  # [T, A]
        weights = 1.0 + probs.gather(1, idx) * self.scale.float()[idx]
        return weights.to(x.dtype), idx


class LinearRouter(nn.Module):
    """A softmax router over a linear gate (Qwen2-MoE / Mixtral style).

    probs = softmax(x W^T) in float32; selected = top-A of (probs + bias); combine weight
    = probs (renormalised over the top-A when norm_topk_prob) times 1 + scale_e.
    """

    def __init__(self, spec: MoESpec):
        super().__init__()
        self.top_k = spec.top_k
        self.norm_topk_prob = spec.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(spec.n_routed, spec.hidden_size))  # [E, d]
        self.scale = nn.Parameter(torch.zeros(spec.n_routed))
        self.register_buffer("bias", torch.zeros(spec.n_routed, dtype=torch.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        return F.linear(x, self.weight).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.logits(x).softmax(dim=-1)
        idx = torch.topk(probs + self.bias, self.top_k, dim=-1).indices
        w = probs.gather(1, idx)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w * (1.0 + self.scale.float()[idx])
        return w.to(x.dtype), idx


def select_by_scores(
    scores: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-A of (scores + bias) [T, E]; combine weight 1 + softmax(scores)_e * scale_e (1 while scale is 0)."""
    idx = torch.topk(scores + bias, top_k, dim=-1).indices  # [T, A]
    weights = 1.0 + scores.softmax(dim=-1).gather(1, idx) * scale.float()[idx]
    return weights.to(dtype), idx


class FittedRouter(nn.Module):
    """A router fitted in closed form on calibration activations (moecarve.carving.fitted_router).

    score_e(x) = w_e . [x ; |h_P(x)|] + c_e, where h_P are the activations of R probe neurons
    (gate rows then up rows in `probe`, as the experts' in_proj); selected = top-A of
    (score + bias); combine weight = 1 + softmax(score)_e * scale_e (scale starts at 0: every
    selected expert weighs 1, as the experts were carved to be summed).
    """

    def __init__(self, spec: MoESpec):
        super().__init__()
        E, d, R = spec.n_routed, spec.hidden_size, spec.router_probes
        rows = 2 * R if spec.gated else R
        self.top_k = spec.top_k
        self.gated = spec.gated
        self.probe = nn.Parameter(torch.empty(rows, d)) if R else None  # [2R, d]
        self.probe_bias = nn.Parameter(torch.empty(rows)) if R and spec.in_bias else None
        self.weight = nn.Parameter(torch.empty(E, d + R))  # [E, d + R]
        self.score_bias = nn.Parameter(torch.empty(E))  # [E]
        self.scale = nn.Parameter(torch.zeros(E))
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))
        self.act = ACT2FN[spec.act]

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        feats = x
        if self.probe is not None:
            h = F.linear(x, self.probe, self.probe_bias)
            h = glu(h, self.act, self.gated)
            feats = torch.cat([x, h.abs()], dim=-1)
        return F.linear(feats, self.weight, self.score_bias).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (weights [T, A] in x.dtype, indices [T, A] int64)."""
        return select_by_scores(self.logits(x), self.bias, self.scale, self.top_k, x.dtype)


ROUTERS = {"analytic": AnalyticRouter, "linear": LinearRouter}
ROUTERS["fitted"] = FittedRouter


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 quantisation: x [T, d] -> (q [T, d] float32 holding integers in
    -127..127, scale [T, 1] float32), q = round_half_even(x / scale), scale = max|x| / 127.

    The CPU and Triton shadow kernels quantise exactly this way, so their integer dot products
    equal F.linear(q, codes) here (exact in float32 while every partial sum stays below 2**24).
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-30)
    return torch.round(xf / scale).clamp_(-127.0, 127.0), scale


# Clip ratios searched per row below 8 bits when the inputs' scale is known: the row's step is
# clip * max|w| / qmax. At 4 bits the max maps a few outliers exactly and rounds every other weight
# coarsely; clipping trades outlier error for finer steps, judged by the error of the dot product
# with the calibration inputs (a weight on a large activation dimension must not be clipped).
CLIP_RATIOS = tuple(0.5 + 0.05 * i for i in range(11))


def quantize_rows(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation of w [..., d] -> (int8 codes [..., d] in -qmax..qmax, float scales [...]).

    importance [d] (the inputs' mean square per dimension, E[x_j^2]): below 8 bits each row's
    step is the clip of CLIP_RATIOS with the least sum_j importance_j (w_j - w~_j)^2, the
    expected squared error of its dot product with x (diagonal); None: the row's max (no clip)."""
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    amax = wf.abs().amax(dim=-1).clamp_min(1e-12)
    scale, best = amax / qmax, None
    for clip in CLIP_RATIOS if bits < 8 and importance is not None else ():
        s = amax * (clip / qmax)
        err = (torch.round(wf / s.unsqueeze(-1)).clamp_(-qmax, qmax).mul_(s.unsqueeze(-1)) - wf).pow_(2)
        err = err.mul_(importance.to(err)).sum(dim=-1)
        if best is None:
            scale, best = s, err
        else:
            better = err < best
            scale, best = torch.where(better, s, scale), torch.where(better, err, best)
    codes = torch.round(wf / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def rounding_bias(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(w - w~) . mean per row, w~ = codes * scale: rows w [..., d], their codes [..., d] and scales
    [...] from quantize_rows, mean [d] float32 -> [...] float32. Added to a shadow row's estimate, it
    cancels the mean of its rounding error over inputs of that mean (MoESpec.shadow_bias)."""
    return (w.float() - codes.float() * scale.unsqueeze(-1)) @ mean


def packs_nibbles(bits: int, hidden_size: int) -> bool:
    """Whether shadow codes of this width are stored two per byte (bits <= 4, even d)."""
    return bits <= 4 and hidden_size % 2 == 0


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., d] in -8..7 -> uint8 [..., d/2]: byte k holds element k in its low nibble
    and element k + d/2 in its high nibble, each as code + 8 (planar halves: a kernel reads two
    contiguous runs of the token rather than interleaved elements)."""
    half = codes.shape[-1] // 2
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., :half] | (u[..., half:] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., d/2] -> int8 codes [..., d] (the inverse of pack_nibbles)."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.cat([lo, hi], dim=-1)


def _int_mm_ok(q: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether torch._int_mm (an int8 GEMM, 2x a float32 one on CPU) takes these shapes."""
    return hasattr(torch, "_int_mm") and q.device.type == "cpu" and q.shape[0] > 16 and q.shape[1] % 8 == 0 \
        and codes.shape[0] % 8 == 0


class ShadowRouter(nn.Module):
    """Routes by a low-bit copy ("shadow") of the routed experts' own input rows.

    score_e(x) = sum_j |act(g~_j(x)) * u~_j(x)| over expert e's m neurons (plain MLPs: |act(h~_j)|),
    h~_r(x) = s(x) * row_scale_r * (codes_r . q(x)) + in_bias_r: the gate/up rows quantised
    symmetrically per row to `shadow_bits` bits (`codes`, `row_scale`) against the token quantised
    to int8 (q(x), s(x): quantize_tokens); a carve that weights the scores (CarveConfig.score_weight)
    folds each neuron's output weight w_j into its up row's scale and bias, so the sum is of
    w_j |act(g~_j) * u~_j|. That is the oracle's ranking signal (each expert's |h|
    mass) for a fraction of the dense rows' bytes, so top-A of it almost always picks the experts
    the full-precision oracle would.
    selected = top-A of (score + bias); combine weight = 1 + softmax(score)_e * scale_e.

    Storage (spec.shadow_layout): "nibbles", `codes` uint8 [E, rows, d/2] with two 4-bit codes
    per byte (pack_nibbles; what carves write for shadow_bits <= 4: 1/4 of the bf16 rows' bytes),
    or "int8", int8 [E, rows, d] (5..8 bits, and folders written before the packed layout, which
    load and run as they are).
    """

    def __init__(self, spec: MoESpec):
        super().__init__()
        E, m, d = spec.n_routed, spec.expert_size, spec.hidden_size
        rows = 2 * m if spec.gated else m
        self.top_k, self.gated = spec.top_k, spec.gated
        packed = spec.shadow_layout == "nibbles"
        codes = torch.zeros(E, rows, d // 2 if packed else d, dtype=torch.uint8 if packed else torch.int8)
        self.register_buffer("codes", codes)  # [E, 2m, d/2] uint8 or [E, 2m, d] int8
        self.row_scale = nn.Parameter(torch.empty(E, rows, dtype=torch.float32), requires_grad=False)  # [E, 2m]
        # [E, m] each neuron's output weight (carving.methods.score_weights), folded into its up
        # row's scale; kept so that requantize folds it again
        self.out_weight = nn.Parameter(torch.ones(E, m), requires_grad=False) if spec.shadow_weighted else None
        # [E, 2m] the experts' own input biases, plus (shadow_bias) each row's quantisation error on
        # the calibration inputs' mean, (w - w~) . mean(x): the estimates' systematic part, which
        # no rounding removes (transformer activations have a large mean in a few dimensions)
        self.in_bias = nn.Parameter(torch.empty(E, rows), requires_grad=False) if spec.in_bias or spec.shadow_bias else None
        # [d] the calibration inputs' mean (shadow_bias), kept so that requantize corrects again
        self.input_mean = nn.Parameter(torch.zeros(d), requires_grad=False) if spec.shadow_bias else None
        self.scale = nn.Parameter(torch.zeros(E))
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))
        self.selection = spec.selection
        if spec.selection == "threshold":  # every expert whose score + bias exceeds it is picked (at most top_k)
            self.register_buffer("threshold", torch.tensor(float("inf")))
        else:
            self.threshold = None
        self.act = ACT2FN[spec.act]

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts every floating parameter; row_scale belongs to the quantisation,
        # not to the model's dtype, and stays float32 (what the kernels read)
        super()._apply(fn, recurse)
        for p in (self.row_scale, self.out_weight, self.input_mean):
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def code_matrix(self) -> torch.Tensor:
        """The codes as an int8 matrix [E * rows, d] (the kernels read them packed instead)."""
        codes = unpack_nibbles(self.codes) if self.codes.dtype == torch.uint8 else self.codes
        return codes.reshape(-1, codes.shape[-1])

    def estimates(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E, m] float32
        """Each routed neuron's estimated activation w_j act(g~_j) u~_j (w_j its out_weight, 1 when
        the carve does not weight), signed: what the scores sum the magnitudes of, and what the
        tail (TailNeurons) multiplies its columns by."""
        E, rows = self.row_scale.shape
        q, s = quantize_tokens(x)  # [T, d] integers, [T, 1]
        codes = self.code_matrix()
        if _int_mm_ok(q, codes):
            dots = torch._int_mm(q.to(torch.int8), codes.t()).float()  # int8 GEMM (prefill): the same integers
        else:
            dots = F.linear(q, codes.float())  # exact in float32 too
        dots = dots.view(-1, E, rows)
        h = dots * (s.unsqueeze(-1) * self.row_scale)  # [T, E, 2m]
        if self.in_bias is not None:
            h = h + self.in_bias.float()
        return glu(h, self.act, self.gated)

    @staticmethod
    def scores(est: torch.Tensor) -> torch.Tensor:  # [T, E, m] -> [T, E]
        """The experts' scores from their neurons' estimates: the sum of the magnitudes."""
        return est.abs().sum(dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        return self.scores(self.estimates(x))

    def select(self, scores: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [T, E] -> (weights [T, A] in dtype, indices [T, A] int64); with "threshold"
        selection the slots whose score + bias does not exceed the threshold weigh 0."""
        weights, idx = select_by_scores(scores, self.bias, self.scale, self.top_k, dtype)
        if self.selection == "threshold":
            weights = weights * ((scores + self.bias).gather(1, idx) > self.threshold)
        return weights, idx

    def forward(self, x: torch.Tensor, estimates: bool = False) -> tuple[torch.Tensor, ...]:
        """x [T, d] -> (weights [T, A] in x.dtype, indices [T, A] int64), and with `estimates` the
        neurons' estimates [T, E, m] (what a tail reads) as a third element."""
        est = self.estimates(x)
        weights, idx = self.select(self.scores(est), x.dtype)
        return (weights, idx, est) if estimates else (weights, idx)

    @torch.no_grad()
    def requantize(self, in_proj: torch.Tensor, bits: int, in_bias: torch.Tensor | None = None) -> None:
        """Rebuild codes, row scales and the bias from the experts' current input rows in_proj
        [E, rows, d] and biases in_bias [E, rows] (after their weights changed, e.g. a merged LoRA
        fine-tune), one expert at a time."""
        for e in range(in_proj.shape[0]):
            codes, scale = quantize_rows(in_proj[e], bits)
            if self.in_bias is not None:
                bias = torch.zeros_like(scale) if in_bias is None else in_bias[e].float()
                if self.input_mean is not None:
                    bias = bias + rounding_bias(in_proj[e], codes, scale, self.input_mean)
            if self.out_weight is not None:  # gated: the up rows are the second half
                up = slice(scale.shape[0] - self.out_weight.shape[1], None)
                scale[up] *= self.out_weight[e]
                if self.in_bias is not None:
                    bias[up] *= self.out_weight[e]
            self.codes[e].copy_(pack_nibbles(codes) if self.codes.dtype == torch.uint8 else codes)
            self.row_scale[e].copy_(scale)
            if self.in_bias is not None:
                self.in_bias[e].copy_(bias)


ROUTERS["shadow"] = ShadowRouter


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor | None = None) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if w is not None and any(n * x.element_size() % 16 for n in w.shape[-2:]):  # its strides must be 16-byte multiples
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_linear(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert times their expert's weight: x [N, k], w [E, n, k] -> [N, n].

    `expert` [N] is each row's expert (non-decreasing), `offs` [E] the cumulative row counts.
    Uses torch._grouped_mm where the device supports it, else a gathered batched matmul.
    """
    if _grouped_mm_ok(x, w) and x.shape[0] > 0:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return torch.bmm(w[expert], x.unsqueeze(-1)).squeeze(-1)


class RoutedExperts(nn.Module):
    """E routed experts with stacked weights, run as two grouped matmuls over sorted tokens, or,
    for small experts (m < DENSE_BELOW_M, where gathering a d-wide row per (token, expert) costs
    more than the expert's 3md multiply-adds) or most experts picked, as the dense MLP over all
    experts with the unpicked ones weighted 0."""

    DENSE_BELOW_M = 32

    def __init__(self, spec: MoESpec):
        super().__init__()
        E, m, d = spec.n_routed, spec.expert_size, spec.hidden_size
        rows = 2 * m if spec.gated else m
        self.gated = spec.gated
        self.in_proj = nn.Parameter(torch.empty(E, rows, d))  # [E, 2m, d]
        self.out_proj = nn.Parameter(torch.empty(E, d, m))  # [E, d, m]
        self.in_bias = nn.Parameter(torch.empty(E, rows)) if spec.in_bias else None  # [E, 2m]
        self.act = ACT2FN[spec.act]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], idx [T, A], weights [T, A] -> sum_a weights[t, a] * expert_{idx[t, a]}(x[t])."""
        T, A = idx.shape
        E = self.in_proj.shape[0]
        if self.out_proj.shape[-1] < self.DENSE_BELOW_M or 2 * A >= E:
            return self.dense(x, idx, weights)
        flat = idx.reshape(-1)  # [T*A]
        order = flat.argsort(stable=True)  # slots sorted by expert
        expert = flat[order]  # [T*A] non-decreasing
        token = order // A  # [T*A] the token of each sorted slot
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)  # [E]

        h = grouped_linear(x[token], self.in_proj, expert, offs)  # [T*A, 2m]
        if self.in_bias is not None:
            h = h + self.in_bias[expert]
        h = glu(h, self.act, self.gated)
        o = grouped_linear(h, self.out_proj, expert, offs)  # [T*A, d]
        o = o * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, o)

    def dense(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum computed for every expert, unpicked ones weighted 0: [T, d] -> [T, d]."""
        E, rows, d = self.in_proj.shape
        m = self.out_proj.shape[-1]
        bias = None if self.in_bias is None else self.in_bias.reshape(-1)
        h = F.linear(x, self.in_proj.reshape(E * rows, d), bias).view(-1, E, rows)  # a view of in_proj: no copy
        h = glu(h, self.act, self.gated)  # [T, E, m]
        c = torch.zeros(x.shape[0], E, dtype=h.dtype, device=h.device).scatter_add_(1, idx, weights.to(h.dtype))
        h = (h * c.unsqueeze(-1)).reshape(-1, E * m)
        return F.linear(h, self.out_proj.permute(1, 0, 2).reshape(d, E * m))  # [d, E*m]: one copy of out_proj



class TailNeurons(nn.Module):
    """The tail: routed neurons just below the router's cut, added from its own estimates.

    A carve keeps a token's picked experts exact and drops the rest; most of what it drops sits in
    the neurons that scored just below the cut. Their activations are already estimated by the
    shadow router (ShadowRouter.estimates, est [T, N] over the N = E m routed neurons), so each
    neuron outside the picked experts whose |est| exceeds `threshold` (calibrated so that
    spec.tail_neurons of them pass per token on average) adds est * its output column, stored
    4-bit: y_tail = sum_j est_j * scale_j * (codes_j - 8). A tail neuron reads d/2 bytes where
    an exact one reads its gate row, up row and output column (6d bytes in bf16).

    codes uint8 [N, ceil(d/2)]: each output column in 4 bits, two per byte as pack_nibbles has them
    (element k low, k + d/2 high, each code + 8; an odd d is padded with a zero element).
    scale [N] float32: the column's step divided by the neuron's out_weight (est carries it).
    """

    def __init__(self, spec: MoESpec):
        super().__init__()
        n, d = spec.n_routed * spec.expert_size, spec.hidden_size
        self.hidden_size = d
        self.register_buffer("codes", torch.zeros(n, (d + 1) // 2, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:  # a quantisation scale, not a model weight: stays float32
            self.scale.data = self.scale.data.float()
        return self

    def columns(self) -> torch.Tensor:
        """The dequantised output columns, unscaled codes [N, d] float32."""
        return unpack_nibbles(self.codes)[:, : self.hidden_size].float()

    def forward(self, est: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """est [T, N] the router's estimates, free [T, N] bool (the neurons outside the token's
        picked experts) -> the tail's output [T, d] float32."""
        keep = free & (est.abs() > self.threshold)
        return (est * keep * self.scale) @ self.columns()

class CarvedMoE(nn.Module):
    """Drop-in replacement for a dense MLP: y = shared(x) + sum_{e in top-A} w_e * expert_e(x) + b."""

    def __init__(self, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.shared = SharedExpert(spec) if spec.n_shared > 0 else None
        self.experts = RoutedExperts(spec)
        self.router = ROUTERS[spec.router](spec)
        self.out_bias = nn.Parameter(torch.empty(spec.hidden_size)) if spec.out_bias else None
        self.tail = TailNeurons(spec) if spec.tail_neurons > 0 else None
        # Optional fast path, set only by moecarve.modules.fast.use_kernels (never saved): a function
        # (module, hidden_states) -> output, or None to run the reference code below.
        self.fast_forward = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fast_forward is not None:
            y = self.fast_forward(self, hidden_states)
            if y is not None:
                return y
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, d]
        if self.tail is None:
            weights, idx = self.router(x)
            y = self.experts(x, idx, weights)
        else:  # the router's estimates serve both its scores and the tail
            weights, idx, est = self.router(x, estimates=True)  # est [T, E, m]
            free = torch.ones(est.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, idx, weights == 0)  # [T, E]
            free = free.repeat_interleave(est.shape[2], dim=1)  # [T, E m]
            y = self.experts(x, idx, weights) + self.tail(est.flatten(1), free).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.view(shape)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"S{s.n_shared}A{s.top_k}E{s.n_shared + s.n_routed}, m={s.expert_size}, "
            f"d={s.hidden_size}, act={s.act}, router={s.router}"
        )


@torch.no_grad()
def requantize_shadows(model: nn.Module) -> int:
    """Rebuild every shadow router's codes from its experts' current input rows (after the experts
    changed, e.g. a merged LoRA fine-tune; a carve's codes already match). Returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, CarvedMoE) and isinstance(mod.router, ShadowRouter):
            mod.router.requantize(mod.experts.in_proj, mod.spec.shadow_bits, mod.experts.in_bias)
            n += 1
    return n


MODULE_TYPES = {"moe": (MoESpec, CarvedMoE), "identity": (None, nn.Identity)}


def build_module(entry: dict) -> nn.Module:
    """Build an empty module from its config.json entry ({"type": ..., **spec})."""
    kind = entry.get("type", "moe")
    if kind not in MODULE_TYPES:
        raise ValueError(f"unknown moecarve module type {kind!r}")
    spec_cls, mod_cls = MODULE_TYPES[kind]
    return mod_cls() if spec_cls is None else mod_cls(spec_cls.from_dict(entry))


def install_modules(model: nn.Module, entries: dict[str, dict]) -> None:
    """Replace submodules (dotted path -> config entry) by empty carved modules."""
    for path, entry in entries.items():
        model.set_submodule(path, build_module(entry))
