"""`condense(model, CondenseConfig, calibration)`: shrink chosen MoE layers into small dense layers (CD-MoE).

One sequential pass over the original model records, per MoE layer, its inputs and outputs on the
calibration windows, computes the experts' mean routing weights (step 1), chooses the always-on
experts greedily (step 2) and builds that layer's condensed candidate (step 4). The greedy layer
search (step 3, layers.py) then picks which candidates replace their MoE layers. Optionally the
condensed layers alone are then fine-tuned by next-token loss (step 5, tune.py).

Where the source architecture's config can hold the condensed layers as its own dense layers
(families.DenseLayers: same width, no shared-expert gate, allowed positions), they are installed
as the family's dense MLP and the config is updated, so the model saves as a plain transformers
model; otherwise as moecarve modules (moecarve's format). The report says which, and why.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..carve import MOECARVE_FORMAT
from .config import CondenseConfig, CondenseError
from .experts import ExpertChoice, build_condensed, choose_experts, mean_routing_weights
from .families import family_of, moe_layers, native_dense_mlp, native_dense_reason
from .layers import search_layers
from .propagate import decoder_layers, first_layer_inputs, run_layer
from .tune import TuneReport, tune_condensed

MOECARVE = "moecarve"  # CondenseReport.format of models saved with moecarve's modules


@dataclass
class LayerStep:
    """One condensed layer, in the order the layer search added it."""

    layer: int  # index in the decoder stack
    path: str  # dotted path of the replaced MoE module
    experts: list[int]  # routed experts kept always-on, in the order the expert search added them
    expert_weights: list[float]  # their mean routing weights, folded into the dense layer
    js_layer: list[float]  # layer-output JS: shared only, then after each added expert
    js_model: float  # final-hidden JS once this layer (and the ones before it) are condensed


@dataclass
class CondenseReport:
    """What a condense did and measured; saved as condense_report.json next to the weights."""

    config: CondenseConfig
    steps: list[LayerStep] = field(default_factory=list)
    seconds: float = 0.0  # search time (steps 1-4)
    n_windows: int = 0
    seqlen: int = 0
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0  # parameters + buffers
    bytes_after: int = 0
    format: str = MOECARVE  # how the model saves: "moecarve", or its own model_type (e.g. "qwen3_moe")
    format_reason: str = ""  # one line: why that format
    finetune: TuneReport | None = None  # the fine-tune of the condensed layers, when config.finetune_steps > 0

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.steps]

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.steps]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["layers"] = self.layers
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class CondensePlan:
    """Every MoE layer's condensed candidate plus the chosen order; apply() installs a prefix."""

    config: CondenseConfig
    candidates: dict[int, tuple[str, nn.Module]]  # decoder index -> (MoE path, CondensedMLP)
    choices: dict[int, ExpertChoice]
    order: list[int]  # chosen decoder indices, in the order added
    js_model: list[float]  # final-hidden JS after each addition
    seconds: float
    n_windows: int
    seqlen: int


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes of parameters + buffers), each tensor counted once (tied weights)."""
    seen: set[int] = set()
    n_params = n_bytes = 0
    for t, is_param in [(p, True) for p in model.parameters()] + [(b, False) for b in model.buffers()]:
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        n_bytes += t.numel() * t.element_size()
        n_params += t.numel() if is_param else 0
    return n_params, n_bytes


def validate(model: nn.Module, config: CondenseConfig, calibration: torch.Tensor) -> dict[str, nn.Module]:
    """Every check that can fail before condensing (calibration windows, enough MoE layers of a
    known family, R within each layer's routed experts); returns the MoE layers by path."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise CondenseError("calibration must be a LongTensor of token windows [n_samples, seqlen]")
    if calibration.numel() == 0:
        raise CondenseError("calibration holds no tokens")
    moes = moe_layers(model)
    if config.n_layers > len(moes):
        raise CondenseError(f"cannot condense {config.n_layers} layers: the model has {len(moes)} MoE layers")
    for path, mod in moes.items():
        view = family_of(mod).read(mod, model.config)
        if config.n_experts > view.n_routed:
            raise CondenseError(f"{path} has {view.n_routed} routed experts; cannot keep R={config.n_experts}")
        if config.n_experts == 0 and view.shared_out is None:
            raise CondenseError(f"{path} has no shared experts: condensing it needs R >= 1 (--experts)")
    return moes


def _subsample(n: int, k: int | None, seed: int, device) -> torch.Tensor | None:
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values.to(device)


@torch.no_grad()
def plan(model: nn.Module, config: CondenseConfig, calibration: torch.Tensor, progress: bool = True) -> CondensePlan:
    """Steps 1-4 without changing the model: every candidate, and the greedy layer order."""
    moes = validate(model, config, calibration)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    stack, layers = decoder_layers(model, next(iter(moes)))
    by_index = {}  # decoder index -> MoE path
    for path in moes:
        if decoder_layers(model, path)[0] != stack:
            raise CondenseError(f"{path} is not in the decoder stack {stack}")
        by_index[int(path[len(stack) + 1 :].split(".")[0])] = path
    args = first_layer_inputs(model, layers, calibration)
    h = args.hidden
    inputs: list[torch.Tensor] = []
    candidates: dict[int, tuple[str, nn.Module]] = {}
    choices: dict[int, ExpertChoice] = {}
    for i in tqdm(range(len(layers)), desc="choosing experts", unit="layer", disable=not progress):
        inputs.append(h)
        path = by_index.get(i)
        mod = model.get_submodule(path) if path else None
        h_out, x, y = run_layer(layers[i], args, h, moe=mod)
        if mod is not None:
            fam = family_of(mod)
            view = fam.read(mod, model.config)
            w_route, idx = fam.route(mod, x)
            w_mean = mean_routing_weights(w_route, idx, view.n_routed, config.weighting)
            sel = _subsample(x.shape[0], config.max_tokens, config.seed + i, x.device)
            out = h_out.reshape(-1, h_out.shape[-1])
            if sel is not None:
                x, y, out = x[sel], y[sel], out[sel]
            choice = choose_experts(view, x, out, y, w_mean, config.n_experts)
            choices[i] = choice
            candidates[i] = (path, build_condensed(view, choice.experts, choice.weights))
        h = h_out
    best = search_layers(model, layers, args, inputs, h, candidates, config.n_layers, config.beam, progress)
    model.train(was_training)
    return CondensePlan(
        config=config, candidates=candidates, choices=choices, order=list(best.chosen), js_model=best.js,
        seconds=time.perf_counter() - t0, n_windows=calibration.shape[0], seqlen=calibration.shape[1],
    )  # fmt: skip


def native_format_reason(model: nn.Module, plan: CondensePlan, layers: list[int]) -> str | None:
    """Why the condensed `layers` of `plan` cannot be saved in the model's own architecture; None if they can."""
    if (getattr(model.config, "moecarve", None) or {}).get("modules"):
        return "the model already holds moecarve modules (a carved or condensed model)"
    families = {family_of(model.get_submodule(plan.candidates[i][0])) for i in layers}
    if len(families) != 1:
        return "its condensed layers come from different MoE families"
    specs = [plan.candidates[i][1].spec for i in layers]
    return native_dense_reason(families.pop(), model.config, layers, specs)


def _install_native(model: nn.Module, plan: CondensePlan, layers: list[int]) -> str:
    """Replace the MoE modules of `layers` by the family's dense MLP and mark them dense in the config."""
    fam = None
    for i in layers:
        path, mod = plan.candidates[i]
        moe = model.get_submodule(path)
        fam = family_of(moe)
        model.set_submodule(path, native_dense_mlp(fam, moe, model.config, mod))
    fam.dense.mark(model.config, layers)
    return f"{fam.name}'s config holds the condensed layers as its own dense layers ({fam.dense.attr})"


def _install_moecarve(model: nn.Module, plan: CondensePlan, layers: list[int]) -> None:
    """Install copies of the CondensedMLP candidates and record them in model.config.moecarve."""
    meta = dict(getattr(model.config, "moecarve", None) or {})
    modules = dict(meta.get("modules", {}))
    for i in layers:
        path, mod = plan.candidates[i]
        model.set_submodule(path, copy.deepcopy(mod))  # the plan's candidates stay untouched (fine-tuning)
        modules[path] = mod.spec.to_dict()
    meta.update(format=MOECARVE_FORMAT, modules=modules, condense={**plan.config.to_dict(), "layers": layers})
    model.config.moecarve = meta


def apply(model: nn.Module, plan: CondensePlan, n_layers: int | None = None) -> CondenseReport:
    """Install the first n_layers (default: all) of the plan's chosen layers into `model`, in place.

    They become the source family's own dense layers where its config can express them (see
    CondenseReport.format), else CondensedMLP modules recorded in model.config.moecarve; either way
    save_condensed and reloading round-trip them. Training-free (no fine-tuning here).
    """
    n = len(plan.order) if n_layers is None else n_layers
    if not 0 <= n <= len(plan.order):
        raise CondenseError(f"the plan chose {len(plan.order)} layers; cannot apply {n}")
    layers = plan.order[:n]
    params_before, bytes_before = model_bytes(model)
    report = CondenseReport(config=plan.config, seconds=plan.seconds, n_windows=plan.n_windows, seqlen=plan.seqlen,
                            params_before=params_before, bytes_before=bytes_before)  # fmt: skip
    for k, layer in enumerate(layers):
        ch = plan.choices[layer]
        path = plan.candidates[layer][0]
        report.steps.append(LayerStep(layer, path, list(ch.experts), list(ch.weights), list(ch.js), plan.js_model[k]))
    reason = native_format_reason(model, plan, layers) if layers else "nothing condensed"
    if reason is None:
        report.format, report.format_reason = model.config.model_type, _install_native(model, plan, layers)
    else:
        _install_moecarve(model, plan, layers)
        report.format, report.format_reason = MOECARVE, f"not expressible in {model.config.model_type}: {reason}"
    report.params_after, report.bytes_after = model_bytes(model)
    return report


def finetune_condensed(model: nn.Module, report: CondenseReport, windows: torch.Tensor, config: CondenseConfig | None = None,
                       progress: bool = True) -> TuneReport:  # fmt: skip
    """Step 5: train the layers `report` condensed (only them) on token windows [n, seqlen].

    The finetune_* settings and seed come from `config` (default: report.config), e.g. to fine-tune
    after a training-free condense. Records the TuneReport in report.finetune and returns it.
    """
    report.finetune = tune_condensed(model, report.paths, windows, config or report.config, progress)
    return report.finetune


def condense(model: nn.Module, config: CondenseConfig, calibration: torch.Tensor, progress: bool = True,
             finetune_windows: torch.Tensor | None = None) -> CondenseReport:  # fmt: skip
    """Condense config.n_layers MoE layers of `model` into dense layers, in place (CD-MoE).

    Args:
        model: a causal LM whose MoE layers are in families.FAMILIES (moecarve carved models,
            Qwen2-MoE, DeepSeek-V2/V3; Mixtral, OLMoE, Qwen3-MoE with n_experts >= 1).
        config: CondenseConfig(n_layers=L, n_experts=R, beam=1, finetune_steps=0, ...).
        calibration: token windows [n_samples, seqlen] (see moecarve.load_windows).
        finetune_windows: token windows [n, seqlen'] the condensed layers are fine-tuned on when
            config.finetune_steps > 0 (default: `calibration`).
    Returns:
        a CondenseReport: chosen layers in order, experts kept per layer, JS after each step,
        parameters and bytes before/after, search time, save format, and the fine-tune's losses.
    """
    report = apply(model, plan(model, config, calibration, progress))
    if config.finetune_steps:
        windows = calibration if finetune_windows is None else finetune_windows
        finetune_condensed(model, report, windows, progress=progress)
    return report
