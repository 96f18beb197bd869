"""`carve(model, CarveConfig, calibration)`: turn every FFN of a dense causal LM into an MoE, in place.

For each decoder layer, in order: propagate the calibration windows through it (on the outputs of
the already-carved layers), record its FFN inputs, carve the FFN (methods.carve_ffn), swap the
carved module in, and propagate again so the next layer sees the carved outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import adapters
from .capture import LayerInputs, first_layer_inputs, on_device, run_layer
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

    @property
    def load_imbalance(self) -> float:
        """Worst max/mean routed-expert load over layers, on the calibration tokens."""
        vals = [r.load_imbalance for r in self.layers]
        return max(vals) if vals else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["load_imbalance"] = self.load_imbalance
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
        keep = {k: d[k] for k in ("seconds", "n_windows", "seqlen", "params_dense", "params_total", "params_active") if k in d}
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
) -> tuple[dict[str, nn.Module], LayerReport]:
    """Carve decoder layer i (already on `device`) in place and advance `inputs` past it.

    Records the layer's FFN inputs, carves the FFN, installs the carved module, then propagates
    the windows through the carved layer so that `inputs.hidden` holds its outputs. The one step
    shared by in-memory and streamed carving, so both give bit-identical results.

    park: called with the FFN's tensors, a context manager that may free the rest of the layer
    (attention, norms) while the FFN is carved and must restore it (the streamed carve's).
    """
    layer = adapters.decoder_layers(model)[i]
    _, x = run_layer(layer, inputs, device, capture=adapters.ffn_input_module(model.config, layer))
    ffn = adapters.read_ffn(model.config, layer)
    with park(ffn.tensors()) if park is not None else nullcontext():
        moe, report = carve_ffn(ffn, x.to(ffn.up.dtype), config, layer=i)
        del x, ffn
    installed = adapters.install(model, i, moe)
    inputs.hidden, _ = run_layer(adapters.decoder_layers(model)[i], inputs, device)
    if not torch.isfinite(inputs.hidden).all():
        raise CarveError(f"layer {i}: the carved layer produced NaN or Inf")
    return installed, report


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
    inputs = first_layer_inputs(model, calibration, device)
    installed: dict[str, nn.Module] = {}
    bar = tqdm(range(len(layers)), desc=f"carving {config.name}", unit="layer", disable=not progress)
    for i in bar:
        t_layer = time.perf_counter()
        with on_device(layers[i], device):
            done, layer_report = carve_layer(model, i, inputs, config, device)
        installed.update(done)
        layer_report.seconds = time.perf_counter() - t_layer
        report.layers.append(layer_report)
        bar.set_postfix(load=f"{layer_report.load_imbalance:.2f}")
    _record(model, config, installed)
    report.params_total, report.params_active = count_params(model)
    report.seconds = time.perf_counter() - t0
    model.train(was_training)
    return report
