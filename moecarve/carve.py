"""`carve(model, CarveConfig, calibration)`: turn every FFN of a dense causal LM into an MoE, in place.

For each decoder layer, in order: propagate the calibration windows through it (on the outputs of
the already-carved layers), record its FFN inputs, carve the FFN (methods.carve_ffn), swap the
carved module in, and propagate again so the next layer sees the carved outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import adapters
from .capture import LayerInputs, first_layer_inputs, on_device, run_layer
from .carving.ffn import DenseFFN
from .carving.methods import CarveError, LayerReport, carve_ffn
from .config import CarveConfig
from .modules.moe import CarvedMoE

MOECARVE_FORMAT = 1


@dataclass
class CarveReport:
    """What a carve did and measured; saved as carve_report.json next to the weights."""

    config: CarveConfig
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    n_windows: int = 0
    seqlen: int = 0
    params_dense: int = 0
    params_total: int = 0
    params_active: int = 0

    allocation_seconds: float = 0.0  # measuring the layers' sensitivity (allocation "sensitivity")
    fisher_seconds: float = 0.0  # the Fisher pass of score_weight "fisher"

    @property
    def load_imbalance(self) -> float:
        """Worst max/mean routed-expert load over layers, on the calibration tokens."""
        vals = [r.load_imbalance for r in self.layers]
        return max(vals) if vals else float("nan")

    @property
    def active_fraction(self) -> float:
        """FFN neurons active per token over all layers / all FFN neurons: the mean over layers
        weighted by each layer's FFN size (equal to the requested fraction, up to rounding)."""
        sizes = [r.dense_bytes for r in self.layers]
        if not sum(sizes):
            return float("nan")
        return sum(r.active_fraction * b for r, b in zip(self.layers, sizes)) / sum(sizes)

    @property
    def active_range(self) -> tuple[float, float]:
        """(lowest, highest) active fraction of a layer: the worst layer keeps the lowest."""
        vals = [r.active_fraction for r in self.layers]
        return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))

    @property
    def ffn_bytes_per_token(self) -> int:
        """FFN bytes read per decoded token over all layers (the carved modules' own dtype)."""
        return sum(r.bytes_per_token for r in self.layers)

    @property
    def ffn_dense_bytes(self) -> int:
        """The dense FFNs' bytes over all layers, in the same dtype."""
        return sum(r.dense_bytes for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["load_imbalance"] = self.load_imbalance
        d["active_fraction"] = self.active_fraction
        d["active_range"] = list(self.active_range)
        d["ffn_bytes_per_token"] = self.ffn_bytes_per_token
        d["ffn_dense_bytes"] = self.ffn_dense_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CarveReport":
        config = CarveConfig.from_dict(d["config"])
        # reports written before LayerReport named its statistic and router: "fitted" always
        # measured mean |h| and routed by the shadow (shadow_bits > 0) or probe router
        fitted = config.method == "fitted"
        legacy = {
            "statistic": "mean |h|" if fitted else "activation rate",
            "router": ("shadow" if config.shadow_bits else "fitted") if fitted else config.router,
        }
        layers = [LayerReport(**{**legacy, **r}) for r in d.get("layers", [])]
        keep = {k: d[k] for k in ("seconds", "n_windows", "seqlen", "params_dense", "params_total", "params_active",
                                  "allocation_seconds", "fisher_seconds") if k in d}  # fmt: skip
        return cls(config=config, layers=layers, **keep)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters active per token) of a model or any submodule:
    unselected routed experts do not count.

    Tied embeddings count once (parameters() deduplicates shared tensors).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for mod in model.modules():
        if isinstance(mod, CarvedMoE):
            e = mod.experts
            per_expert = sum(p[0].numel() for p in (e.in_proj, e.out_proj, e.in_bias) if p is not None)
            active = mod.spec.mean_active or mod.spec.top_k  # "threshold" selection: its calibrated mean
            inactive += round((mod.spec.n_routed - active) * per_expert)
    return total, total - inactive


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def ffn_bytes(mod: nn.Module, dense: DenseFFN) -> tuple[int, float, int]:
    """(bytes read per decoded token, active neuron fraction, dense bytes) of one carved FFN.

    A CarvedMoE reads its shared experts, its router's tensors (a shadow router's codes and
    scales), its output bias, A of its E routed experts (the calibrated mean A for
    "threshold" selection) and its tail's 4-bit columns of the neurons it adds; a condensed or dense MLP reads all of its tensors. `dense` is the
    source FFN, whose gate, up, down and biases give the dense bytes (in the carved module's dtype).
    """
    elt = next(mod.parameters()).element_size() if any(True for _ in mod.parameters()) else 4
    dense_bytes = sum(t.numel() for t in dense.tensors()) * elt
    if isinstance(mod, CarvedMoE):
        spec, e = mod.spec, mod.experts
        active = mod.spec.mean_active or spec.top_k
        routed = _nbytes((e.in_proj, e.out_proj, e.in_bias)) * active / spec.n_routed
        fixed = _nbytes(mod.router.parameters()) + _nbytes(b for n, b in mod.router.named_buffers() if n != "bias")
        fixed += _nbytes(mod.shared.parameters()) if mod.shared is not None else 0
        fixed += _nbytes([mod.out_bias])
        if mod.tail is not None:  # the tail's columns and steps, for the neurons a token adds on average
            routed += _nbytes((mod.tail.codes, mod.tail.scale)) * spec.tail_neurons / mod.tail.scale.numel()
        neurons = (spec.n_shared + active) * spec.expert_size
        return round(routed + fixed), neurons / dense.intermediate_size, dense_bytes
    if isinstance(mod, nn.Identity):
        return 0, 0.0, dense_bytes
    width = getattr(getattr(mod, "spec", None), "intermediate_size", dense.intermediate_size)
    return _nbytes(mod.parameters()), width / dense.intermediate_size, dense_bytes


def module_entry(mod: nn.Module) -> dict:
    """The config.json entry that rebuilds `mod` (see modules.moe.build_module)."""
    if isinstance(mod, nn.Identity):
        return {"type": "identity"}
    return mod.spec.to_dict()


def _record(model: nn.Module, cfg: CarveConfig, installed: dict[str, nn.Module]) -> None:
    """Write what was carved into model.config.moecarve (saved with the config)."""
    meta = dict(getattr(model.config, "moecarve", None) or {})
    meta["format"] = MOECARVE_FORMAT
    meta["carve"] = cfg.to_dict()
    modules = dict(meta.get("modules", {}))
    modules.update({path: module_entry(m) for path, m in installed.items()})
    meta["modules"] = modules
    model.config.moecarve = meta


def validate(model: nn.Module, cfg: CarveConfig, calibration: torch.Tensor) -> None:
    """Every check that can fail, before any work starts."""
    adapters.adapter_for(model)  # UnsupportedArchitecture
    layers = adapters.decoder_layers(model)
    for i, layer in enumerate(layers):
        ffn = adapters.read_ffn(model.config, layer)
        m = cfg.expert_size(ffn.intermediate_size)  # ConfigError when N does not divide it
        if cfg.method == "fitted" and not cfg.shadow_bits and not cfg.static and cfg.probes_per_expert > m:
            raise CarveError(
                f"{cfg.name}: experts of {m} neuron(s) cannot hold the probe router's {cfg.probes_per_expert} "
                "probes; use the shadow router (shadow_bits > 0) or larger experts"
            )
        if cfg.k_act > ffn.intermediate_size:
            raise CarveError(f"k_act={cfg.k_act} exceeds layer {i}'s intermediate size {ffn.intermediate_size}")
    if cfg.layer_active is not None and len(cfg.layer_active) != len(layers):
        raise CarveError(f"layer_active lists {len(cfg.layer_active)} layers; the model has {len(layers)}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise CarveError("calibration must be a LongTensor of token windows [n_samples, seqlen]")
    if calibration.numel() == 0:
        raise CarveError("calibration holds no tokens")


@torch.no_grad()
def carve_layer(
    model: nn.Module,
    i: int,
    inputs: LayerInputs,
    config: CarveConfig,
    device: torch.device,
    park: Callable[[list[torch.Tensor]], AbstractContextManager] | None = None,
    fisher: torch.Tensor | None = None,
) -> tuple[dict[str, nn.Module], LayerReport]:
    """Carve decoder layer i (already on `device`) in place and advance `inputs` past it.

    Records the layer's FFN inputs, carves the FFN, installs the carved module, then propagates
    the windows through the carved layer so that `inputs.hidden` holds its outputs. The one step
    shared by in-memory and streamed carving, so both give bit-identical results.

    park: called with the FFN's tensors, a context manager that may free the rest of the layer
    (attention, norms) while the FFN is carved and must restore it (the streamed carve's).
    fisher: the layer's ffn_fisher [d] (score_weight "fisher"; None: the plain down norms).
    """
    layer = adapters.decoder_layers(model)[i]
    # the windows' FFN inputs: each window's forward stops there (nothing after the FFN input is needed);
    # what the layer's heaviest block before the FFN (its attention) returns is kept for the second pass
    heavy, recorded = _block_before_ffn(model, i), []
    _, x = run_layer(layer, inputs, device, capture=adapters.ffn_input_module(model.config, layer), stop=True,
                     record=(heavy, recorded) if heavy is not None else None)  # fmt: skip
    ffn = adapters.read_ffn(model.config, layer)
    with park(ffn.tensors()) if park is not None else nullcontext():
        moe, report, y = carve_ffn(ffn, x.to(ffn.up.dtype), config.for_layer(i), layer=i, outputs=True, fisher=fisher)
        del x
        report.n_active = 0 if config.static else config.active_in(i)
        report.bytes_per_token, report.active_fraction, report.dense_bytes = ffn_bytes(moe, ffn)
        del ffn
    installed = adapters.install(model, i, moe)
    # the carved layer's outputs: the layer runs again with its attention returning what it returned
    # in the first pass (the same inputs) and, where the carve computed the carved FFN's outputs on x
    # (the "fitted" routed carve), the FFN returning those; the rest (norms, residuals) is computed
    replay = [(heavy, recorded)] if recorded else []
    if y is not None:
        replay.append((moe, y))
    inputs.hidden, _ = run_layer(adapters.decoder_layers(model)[i], inputs, device, replay=replay)
    del y, recorded
    if not torch.isfinite(inputs.hidden).all():
        raise CarveError(f"layer {i}: the carved layer produced NaN or Inf")
    return installed, report


# The sensitivity measurement (allocation "sensitivity"): calibration tokens it runs forward and
# backward (the first windows), the grid of routed fractions its curves are given on, and the
# bounds of a layer's share (relative to the uniform one).
SENSITIVITY_TOKENS = 2048
ALLOCATION_GRID = 33
ALLOCATION_BOUNDS = (0.5, 2.0)


class _Probe(nn.Module):
    """Stands in for one FFN while the sensitivity is measured: each token keeps its top `keep`
    neurons by |h|; the dropped part comes back times `alpha` (0, a leaf whose gradient is the loss
    the dropped part costs, to first order). Records the dropped-energy curve at `counts` neurons."""

    def __init__(self, ffn: DenseFFN, keep: int, counts: torch.Tensor):
        super().__init__()
        self.ffn, self.keep, self.counts = ffn, keep, counts
        self.alpha = torch.zeros((), requires_grad=True)
        self.energy = torch.zeros(counts.shape[0], dtype=torch.float64)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from .carving.allocation import dropped_energy

        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        h = self.ffn.hidden(x)  # [T, I]
        with torch.no_grad():
            kept = torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.abs().topk(self.keep, dim=-1).indices, True)
            self.energy += dropped_energy(h, self.ffn.down, self.counts)
        y = F.linear(h * kept, self.ffn.down, self.ffn.down_bias) + self.alpha * F.linear(h * ~kept, self.ffn.down)
        return y.view(shape)


@contextmanager
def _frozen_weights(model: nn.Module):
    """The model in eval mode with grad enabled but no weight requiring it (a backward pass reaches
    activations and probes only); requires_grad flags and the training mode restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def allocate_layers(model: nn.Module, config: CarveConfig, calibration: torch.Tensor) -> tuple[int, ...]:
    """Routed experts per layer (A_l) from the layers' sensitivity on the calibration windows.

    The dense model runs forward and backward on up to SENSITIVITY_TOKENS calibration tokens with
    every FFN keeping, per token, its top neurons at the uniform active fraction: the gradient of
    the loss with respect to a factor on each layer's dropped part is what that part costs, and
    each layer's dropped-energy curve says how the cost moves with its budget
    (carving.allocation.sensitivity_costs). carving.allocation.allocate then spreads the same total
    of routed experts over the layers, each between ALLOCATION_BOUNDS times the uniform share.
    """
    from .carving.allocation import allocate, sensitivity_costs

    layers = adapters.decoder_layers(model)
    grid = torch.linspace(0, 1, ALLOCATION_GRID, dtype=torch.float64)
    probes, homes = [], []
    for i, layer in enumerate(layers):
        ffn = adapters.read_ffn(model.config, layer)
        m = config.expert_size(ffn.intermediate_size)
        shared = config.n_shared * m
        counts = (shared + grid * config.n_routed * m).round().long()  # neurons kept at each routed fraction
        probes.append(_Probe(ffn, shared + config.n_active * m, counts))
        homes.append({path: model.get_submodule(path) for path in adapters.replacements(model.config, i, probes[-1])})
    with _frozen_weights(model):
        try:
            for i, probe in enumerate(probes):
                adapters.install(model, i, probe)
            n = max(1, min(calibration.shape[0], SENSITIVITY_TOKENS // calibration.shape[1]))
            home = next(model.parameters()).device  # the whole model runs where it is (in-memory carves)
            for w in calibration[:n]:
                ids = w.unsqueeze(0).to(home)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[1] - 1)
                loss.backward()
        finally:
            for home in homes:
                for path, module in home.items():
                    model.set_submodule(path, module)
    slopes = torch.stack([-p.alpha.grad if p.alpha.grad is not None else torch.zeros(()) for p in probes])
    energy = torch.stack([p.energy for p in probes])
    costs = sensitivity_costs(slopes, energy, at=round(config.n_active / config.n_routed * (ALLOCATION_GRID - 1)))
    units = torch.full((len(layers),), config.n_routed)
    g0 = config.n_active / config.n_routed
    lo, hi = max(ALLOCATION_BOUNDS[0] * g0, 1 / config.n_routed), min(1.0, ALLOCATION_BOUNDS[1] * g0)
    return tuple(int(a) for a in allocate(costs, grid, units, g0, lo=lo, hi=hi))


# Calibration tokens the Fisher pass runs forward and backward (the first windows): a diagonal
# metric per layer settles on few tokens, and the pass (the LM head's backward above all) is a
# sixth of a SmolLM2 carve's time at 2048.
FISHER_TOKENS = 1024


def ffn_fisher(model: nn.Module, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer, F [d] float32: the mean over tokens of the squared gradient of the LM loss
    with respect to the FFN's output, on up to FISHER_TOKENS calibration tokens of the dense model
    (score_weight "fisher": which output directions the loss is sensitive to)."""
    layers = adapters.decoder_layers(model)
    sums: list[torch.Tensor | int] = [0] * len(layers)

    def hook(i: int):
        def on_output(module, args, out):
            def on_grad(g):
                sums[i] = sums[i] + g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(dim=0)

            out.register_hook(on_grad)

        return on_output

    handles = [adapters.ffn_output_module(model.config, layer).register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    n = max(1, min(calibration.shape[0], FISHER_TOKENS // calibration.shape[1]))
    home = next(model.parameters()).device
    try:
        with _frozen_weights(model):
            for w in calibration[:n]:
                ids = w.unsqueeze(0).to(home)
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # a graph without weight grads
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss * (ids.shape[1] - 1)
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    tokens = n * (calibration.shape[1] - 1)
    return [s / tokens if isinstance(s, torch.Tensor) else torch.zeros(()) for s in sums]


def _block_before_ffn(model: nn.Module, i: int) -> nn.Module | None:
    """Decoder layer i's direct child with the most parameters outside the FFN (its attention), or
    None: what the carve's first pass runs before the FFN input and its second pass replays."""
    layer = adapters.decoder_layers(model)[i]
    ffn_paths = set(adapters.replacements(model.config, i, nn.Identity()))
    ffn_ids = {id(model.get_submodule(p)) for p in ffn_paths}
    children = [c for c in layer.children() if id(c) not in ffn_ids]
    sizes = [sum(p.numel() for p in c.parameters()) for c in children]
    if not children or max(sizes) == 0:
        return None
    return children[sizes.index(max(sizes))]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def carve(
    model: nn.Module,
    config: CarveConfig,
    calibration: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CarveReport:
    """Carve every FFN of `model` into an MoE layer, in place (CMoE, training-free).

    Args:
        model: a Hugging Face causal LM of a supported architecture (see adapters). It is carved
            in its own dtype: load it with `dtype=torch.float32` to carve what the CLI carves on
            CPU (`--dtype auto`: float32 on CPU, bfloat16 on CUDA); `from_pretrained` otherwise
            keeps the checkpoint's dtype (often bfloat16), which changes the statistics and the result.
        config: what to carve (CarveConfig.from_string("S2A2E8")).
        calibration: token windows [n_samples, seqlen] (see calibration.load_windows).
        device: where each layer is carved; layers not already there are moved one at a time
            and moved back afterwards. Default: CUDA when available.
        progress: show a progress bar over layers.
    Returns:
        a CarveReport; `model.config.moecarve` records the carved modules for saving.
    """
    validate(model, config, calibration)
    device = torch.device(device) if device is not None else default_device()
    t0 = time.perf_counter()
    params_dense = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    layers = adapters.decoder_layers(model)
    report = CarveReport(config=config, n_windows=calibration.shape[0], seqlen=calibration.shape[1], params_dense=params_dense)
    if config.allocation != "uniform" and config.layer_active is None and not config.static:
        t_alloc = time.perf_counter()
        config = config.replace(layer_active=allocate_layers(model, config, calibration))
        report.config, report.allocation_seconds = config, time.perf_counter() - t_alloc
    fisher = None
    if config.fisher_pass:
        t_fisher = time.perf_counter()
        fisher = ffn_fisher(model, calibration)
        report.fisher_seconds = time.perf_counter() - t_fisher
    inputs = first_layer_inputs(model, calibration, device)
    installed: dict[str, nn.Module] = {}
    bar = tqdm(range(len(layers)), desc=f"carving {config.name}", unit="layer", disable=not progress)
    for i in bar:
        t_layer = time.perf_counter()
        with on_device(layers[i], device):
            done, layer_report = carve_layer(model, i, inputs, config, device, fisher=None if fisher is None else fisher[i])
        installed.update(done)
        layer_report.seconds = time.perf_counter() - t_layer
        report.layers.append(layer_report)
        bar.set_postfix(load=f"{layer_report.load_imbalance:.2f}")
    _record(model, config, installed)
    report.params_total, report.params_active = count_params(model)
    report.seconds = time.perf_counter() - t0
    model.train(was_training)
    return report
