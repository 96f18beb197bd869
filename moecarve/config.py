"""Configuration dataclasses: what to carve and how, validated before any work starts.

A carving configuration is written S{N_s}A{A}E{N}: N experts in all, N_s of them shared
(always on), A routed experts picked per token out of the N - N_s routed ones.
S2A2E8 keeps 2 + 2 of 8 experts active: 50% of the FFN. Experts may be as small as one neuron
(S0A384E1536 on a 1536-wide FFN: each token keeps its own 384 neurons), and A = 0 is static width
pruning (S2A0E8: a dense MLP of the quarter of the neurons the method ranks highest).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import MoecarveError

_CONFIG_RE = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)

METHODS = ("cmoe", "fitted")
ROUTERS = ("analytic", "linear")
SELECTIONS = ("topk", "threshold")
ALLOCATIONS = ("uniform", "sensitivity")
SCORE_WEIGHTS = ("fisher", "down", "none")  # what the shadow router weights each neuron's |h| by


class ConfigError(MoecarveError, ValueError):
    """A configuration that cannot work, found before any work starts."""


class DictConfig:
    """JSON round trip for the frozen config dataclasses; from_dict ignores keys it does not know
    (a folder written by a newer moecarve still loads)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# the shadow router's default bits (CarveConfig.shadow_bits None): below / from half the routed
# experts active
SHADOW_BITS_LOW, SHADOW_BITS_HIGH = 4, 8
# the tail's default (CarveConfig.tail None): this fraction of the FFN's neurons per token, or all
# the routed neurons left where fewer remain
DEFAULT_TAIL = 0.25


@dataclass(frozen=True)
class CarveConfig(DictConfig):
    """How to carve every FFN of a model into an MoE layer.

    Attributes:
        n_experts: N, experts per layer (shared + routed); must divide the intermediate size.
        n_shared: N_s, always-on experts, fused into one MLP of N_s * m neurons.
        n_active: A, routed experts selected per token; 0 with n_shared >= 1 is static width
            pruning: each FFN becomes a dense MLP of its N_s * m top-ranked neurons.
        k_act: K_a, neurons marked active per token when measuring activation rates.
        method: the carving recipe. "fitted" (the default, training-free): |h|-profile grouping,
            a router that tracks the oracle's choice, and a ridge refit of down_proj (see
            moecarve.carving.methods). "cmoe": the paper's algorithm exactly. Options marked
            "cmoe" or "fitted" below apply to that method only.
        router: "cmoe": "analytic" (built from representative neurons, as the paper) or "linear"
            (a softmax over a linear gate, which the Qwen2-MoE export needs).
        kmeans_iters: "cmoe": balanced k-means iterations over the activation markers.
        bias_gamma: step of the load-balancing bias update while fine-tuning.
        seed: seeds calibration sampling and any randomised step.
        profile_iters: "fitted": balanced k-means iterations over the neurons' |h| profiles.
        probes_per_expert: "fitted": neurons per routed expert whose |h| feeds the router
            (0: a linear router on x alone).
        shadow_bits: "fitted": 2-8 routes with the shadow router, a `shadow_bits`-bit copy of the
            routed experts' input rows that scores each expert by its estimated |h| mass
            (near-oracle routing for a low-bit pass over the routed experts' input rows, about
            1/6 of the dense FFN's bytes at 4 bits vs bf16; see moecarve.modules.moe.ShadowRouter).
            0 routes with the cheaper probe router instead (closed-form scores on x and a few
            probe neurons: faster, lower quality). None (default): SHADOW_BITS_LOW (4) where fewer
            than half the routed experts are active, SHADOW_BITS_HIGH (8) from half on: there the
            selection threshold sits in the bulk of the |h| distribution, where many neurons score
            alike and 4-bit rounding reorders them (measured on SmolLM2 at 50%: the 4-bit scores'
            selection error 35-50% above exact, 8-bit within 1%; perplexity +3.5% -> +2.6%), while
            at 25% the 4-bit error is 10-15% and the 8-bit copy's bytes do not pay.
        score_weight: "fitted" with the shadow router: what each neuron's estimated |h| is
            weighted by in the router's scores, so that the picks keep the most output rather than
            the largest activations: "fisher" (default) its down_proj column's norm under the
            Fisher metric of the FFN output, sqrt(sum_k F_k d_ki^2) with F_k the mean squared
            gradient of the LM loss w.r.t. output k on the first 1024 calibration tokens (one forward
            and backward of the dense model; a streamed carve, which cannot run one, uses "down");
            "down" the column's plain norm ||d_i||; "none" |h| alone. Folded into the shadow
            codes' row scales: the router reads the same bytes.
        shadow_bias: "fitted" with the shadow router: correct each quantised row's estimate by its
            rounding error on the calibration inputs' mean, a bias of (w - w~) . mean(x) per row
            (transformer inputs have a large mean in a few dimensions, so the rounding error has a
            systematic part; the bias removes it for one float per row).
        tail: "fitted" with the shadow router: a fraction of the FFN's neurons per token, on average,
            added beyond the picked experts from the router's own estimates (modules.moe.TailNeurons):
            the routed neurons that score highest among those not picked add est * their output
            column in 4 bits, d/2 bytes each where a picked neuron reads 6d (bf16 rows). The
            dropped neurons' output is where a carve loses most; the ones just below the cut carry
            most of it, and the router has already estimated them. None (default): DEFAULT_TAIL
            (0.25), or the routed neurons left where fewer remain; 0 turns it off (a carve without
            a tail, as before it existed).
        refit: "fitted": refit down_proj by ridge regression on the routed activations.
        refit_bias: "fitted" with refit: also fit an output bias (the mean of what the dropped neurons
            would have added), kept where it lowers the held-out error; the carved FFN then has an
            output bias (out_bias) even where the dense one had none.
        holdout: "fitted": fraction of calibration tokens held out to choose the ridge strengths.
        selection: "fitted" with the shadow router: "topk" (exactly A experts per token) or
            "threshold" (every expert whose score exceeds a per-layer threshold calibrated so that
            A experts are picked per token on average, at most 2A); "auto" (default): threshold
            where the shadow router calibrates it (the better perplexity at the same average
            bytes), else topk.
        allocation: how the routed experts active per token are spread over the layers: "uniform"
            (A in every layer) or "sensitivity" (moecarve.carve measures how much each layer's
            FFN loses at each active fraction on the calibration windows and gives sensitive
            layers more, robust ones fewer: moecarve.carving.allocation; the total over layers,
            and with it the bytes read per token, stays that of A per layer). Static pruning
            (A = 0) is always uniform.
        layer_active: routed experts active per token in each layer (A_l, one per decoder layer),
            filled in by moecarve.carve from the allocation; None: A in every layer. Given by
            hand, it is used as it is.
    """

    n_experts: int = 8
    n_shared: int = 2
    n_active: int = 2
    k_act: int = 10
    method: str = "fitted"
    router: str = "analytic"
    kmeans_iters: int = 1
    bias_gamma: float = 1e-3
    seed: int = 0
    profile_iters: int = 10
    probes_per_expert: int = 2
    shadow_bits: int | None = None
    score_weight: str = "fisher"
    shadow_bias: bool = True
    tail: float | None = None
    refit: bool = True
    refit_bias: bool = False
    holdout: float = 0.25
    selection: str = "auto"
    allocation: str = "uniform"
    layer_active: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ConfigError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.n_shared < 0:
            raise ConfigError(f"n_shared must be >= 0, got {self.n_shared}")
        if self.n_active < 0:
            raise ConfigError(f"n_active must be >= 0, got {self.n_active}")
        if self.n_active == 0 and self.n_shared < 1:
            raise ConfigError(f"{self.name}: static pruning (A = 0) keeps the shared experts only; it needs N_s >= 1")
        if self.n_shared + self.n_active > self.n_experts:
            raise ConfigError(
                f"{self.name}: shared + active experts ({self.n_shared} + {self.n_active}) "
                f"exceed the {self.n_experts} experts"
            )
        if self.k_act < 1:
            raise ConfigError(f"k_act must be >= 1, got {self.k_act}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.profile_iters < 1:
            raise ConfigError(f"profile_iters must be >= 1, got {self.profile_iters}")
        if self.probes_per_expert < 0:
            raise ConfigError(f"probes_per_expert must be >= 0, got {self.probes_per_expert}")
        if self.shadow_bits is None:
            high = self.n_routed > 0 and self.n_active * 2 >= self.n_routed
            object.__setattr__(self, "shadow_bits", SHADOW_BITS_HIGH if high else SHADOW_BITS_LOW)
        if self.shadow_bits and not 2 <= self.shadow_bits <= 8:
            raise ConfigError(f"shadow_bits must be 0 (probe router) or 2..8, got {self.shadow_bits}")
        if self.score_weight not in SCORE_WEIGHTS:
            raise ConfigError(f"unknown score_weight {self.score_weight!r}; choose one of {', '.join(SCORE_WEIGHTS)}")
        routed = self.method == "fitted" and bool(self.shadow_bits) and not self.static
        left = self.unpicked(self.n_active)
        if self.tail is None:
            object.__setattr__(self, "tail", min(DEFAULT_TAIL, left) if routed else 0.0)
        if not 0.0 <= self.tail <= 1.0:
            raise ConfigError(f"tail must be a fraction of the FFN's neurons in [0, 1], got {self.tail}")
        if self.tail > 0 and not routed:
            raise ConfigError("tail > 0 adds neurons from the shadow router's estimates: use method 'fitted' with shadow_bits > 0 "
                              "and routed experts (CLI: --tail 0 turns it off)")  # fmt: skip
        if self.tail > left + 1e-9:
            raise ConfigError(f"{self.name}: a tail of {self.tail:g} exceeds the {left:g} of the neurons a token does not pick")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.selection == "auto":
            object.__setattr__(self, "selection", "threshold" if self.method == "fitted" and self.shadow_bits else "topk")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; choose one of auto, {', '.join(SELECTIONS)}")
        if self.selection == "threshold" and not (self.method == "fitted" and self.shadow_bits):
            raise ConfigError("selection='threshold' is calibrated on the shadow router: use method 'fitted' with shadow_bits > 0")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.layer_active is not None:
            object.__setattr__(self, "layer_active", tuple(int(a) for a in self.layer_active))  # a JSON list reads back
            if self.static:
                raise ConfigError(f"{self.name}: static pruning (A = 0) has no routed experts to allocate per layer")
            if not self.layer_active or not all(1 <= a <= self.n_routed for a in self.layer_active):
                raise ConfigError(f"{self.name}: layer_active needs, per layer, 1 to {self.n_routed} routed experts")
        if self.method == "fitted" and self.router != "analytic":
            raise ConfigError(
                f"router={self.router!r} is a choice of method 'cmoe' (method 'fitted' builds its own router); "
                "use method='cmoe' (CLI: --method cmoe) with it"
            )

    @property
    def name(self) -> str:
        return f"S{self.n_shared}A{self.n_active}E{self.n_experts}"

    @property
    def n_routed(self) -> int:
        return self.n_experts - self.n_shared

    @property
    def active_fraction(self) -> float:
        return (self.n_shared + self.n_active) / self.n_experts

    def active_in(self, layer: int) -> int:
        """A_l, the routed experts active per token in decoder layer `layer`."""
        if self.layer_active is None:
            return self.n_active
        if not 0 <= layer < len(self.layer_active):
            raise ConfigError(f"layer_active holds {len(self.layer_active)} layers, not layer {layer}")
        return self.layer_active[layer]

    def for_layer(self, layer: int) -> "CarveConfig":
        """The configuration decoder layer `layer` is carved with: A = A_l (no per-layer list)."""
        if self.layer_active is None:
            return self
        a = self.active_in(layer)  # a layer given more than the average keeps the tail that still fits
        return replace(self, n_active=a, layer_active=None, tail=min(self.tail, self.unpicked(a)))

    def unpicked(self, n_active: int) -> float:
        """The fraction of the FFN's neurons in routed experts that a token picking n_active does not pick
        (what a tail can add at most)."""
        return (self.n_routed - n_active) / self.n_experts

    @property
    def fisher_pass(self) -> bool:
        """Whether the carve measures the Fisher metric first (score_weight "fisher" on the shadow router)."""
        return self.score_weight == "fisher" and self.method == "fitted" and bool(self.shadow_bits) and not self.static

    @property
    def static(self) -> bool:
        """Static width pruning (A = 0): no routed experts, no router."""
        return self.n_active == 0

    @classmethod
    def from_string(cls, spec: str, **overrides) -> "CarveConfig":
        """Parse "S2A2E8" (case-insensitive) into a config; keyword overrides set the rest."""
        m = _CONFIG_RE.match(spec.strip())
        if not m:
            raise ConfigError(
                f"cannot parse carving config {spec!r}: expected S<shared>A<active>E<experts>, e.g. S2A2E8"
            )
        n_shared, n_active, n_experts = (int(g) for g in m.groups())
        return cls(n_experts=n_experts, n_shared=n_shared, n_active=n_active, **overrides)

    @classmethod
    def from_granularity(
        cls, intermediate_size: int, expert_size: int, active: float, shared: float = 0.0, **overrides
    ) -> "CarveConfig":
        """The S/A/E spec for experts of `expert_size` neurons with an `active` fraction of the FFN
        per token, `shared` of it always on: E = I / m, N_s = round(shared * E),
        A = round(active * E) - N_s. E.g. I = 1536, m = 4, active 0.25 -> S0A96E384."""
        if expert_size < 1 or intermediate_size % expert_size:
            raise ConfigError(f"expert size {expert_size} does not divide the intermediate size {intermediate_size}")
        if not 0.0 < active <= 1.0 or not 0.0 <= shared <= active:
            raise ConfigError(f"need 0 < active <= 1 and 0 <= shared <= active, got active={active}, shared={shared}")
        n = intermediate_size // expert_size
        n_shared = round(shared * n)
        return cls(n_experts=n, n_shared=n_shared, n_active=round(active * n) - n_shared, **overrides)

    def expert_size(self, intermediate_size: int) -> int:
        """m = intermediate_size / N, or a ConfigError when N does not divide it."""
        if intermediate_size % self.n_experts:
            divisors = sorted({n for n in (4, 8, 16, 32, 64, 128, intermediate_size) if intermediate_size % n == 0})
            raise ConfigError(
                f"{self.name}: {self.n_experts} experts do not divide the intermediate size "
                f"{intermediate_size}; choose N among {divisors or 'its divisors'}"
            )
        return intermediate_size // self.n_experts

    def replace(self, **changes) -> "CarveConfig":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "CarveConfig":
        # configs written before score_weight / shadow_bias existed carved with unweighted scores and
        # no shadow bias; before shadow_bits could be left to the rule, with 4-bit codes; before the
        # tail, without one
        return super().from_dict({"score_weight": "none", "shadow_bias": False, "shadow_bits": SHADOW_BITS_LOW, "tail": 0.0, **d})


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration windows to draw.

    Attributes:
        source: None for the corpus shipped with moecarve, a text file, or a local
            Hugging Face `datasets` folder (saved with `save_to_disk`) with a "text" column.
        n_samples: number of windows.
        seqlen: tokens per window (clipped to the model's max positions).
        seed: seeds the window offsets.
    """

    source: str | None = None
    n_samples: int = 8
    seqlen: int = 2048
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2, got {self.seqlen}")
