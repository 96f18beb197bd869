"""Sequential layer-by-layer propagation of calibration windows (as GPTQ / SparseGPT do).

The inputs of decoder layer l are the outputs of the already-carved layers 0..l-1, so each layer
is carved on what it will really see. Only one layer's activations are held at a time:
hidden states [N, L, d] plus that layer's FFN inputs [N * L, d] while it is carved.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import adapters


class _Stop(Exception):
    """Raised by the hook on layer 0 once its inputs are captured."""


@dataclass
class LayerInputs:
    """What every decoder layer is called with: hidden states [N, L, d] + the shared arguments."""

    hidden: torch.Tensor  # [N, L, d]
    args: tuple  # positional arguments after hidden_states (usually empty)
    kwargs: dict  # attention mask, position ids / embeddings, ... (identical for every window)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Move a module to `device` for the duration of the block, then back where it was."""
    p = next(module.parameters(), None)
    home = p.device if p is not None else device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _non_layer_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The model's top-level modules outside the decoder stack (embeddings, rotary, norms)."""
    layer_ids = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in layer_ids and not list(m.children()) and m is not model]


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, layers: nn.ModuleList | None = None
) -> LayerInputs:
    """Run the embeddings on each window [N, L] and capture what layer 0 receives.

    `layers` is the decoder stack (default: where the adapter table says it is).
    """
    layers = adapters.decoder_layers(model) if layers is None else layers
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.setdefault("hidden", []).append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs.pop("hidden_states", None)
        captured["args"], captured["kwargs"] = args[1:], kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    outside = _non_layer_modules(model, layers)
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    try:
        for m in outside:
            m.to(device)
        for w in windows:
            try:
                model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m, home in zip(outside, homes):
            if home.type != "meta":
                m.to(home)
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "past_key_value", "layer_past")}
    kwargs["use_cache"] = False
    return LayerInputs(hidden=torch.cat(captured["hidden"]), args=captured["args"], kwargs=kwargs)


@torch.no_grad()
def run_layer(
    layer: nn.Module, inputs: LayerInputs, device: torch.device, capture: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Propagate every window through one decoder layer on `device`.

    Returns (outputs [N, L, d] on the inputs' device, FFN inputs [N * L, d] on `device` or None).
    `capture` is the module whose input is recorded (the FFN, see adapters.ffn_input_module).
    """
    seen: list[torch.Tensor] = []
    handle = None
    if capture is not None:
        handle = capture.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    args, kwargs = _to(inputs.args, device), _to(inputs.kwargs, device)
    out = torch.empty_like(inputs.hidden)
    try:
        with on_device(layer, device):
            for i in range(inputs.hidden.shape[0]):
                y = layer(inputs.hidden[i : i + 1].to(device), *args, **kwargs)
                out[i] = (y[0] if isinstance(y, tuple) else y).to(out.device)
    finally:
        if handle is not None:
            handle.remove()
    return out, (torch.cat(seen) if seen else None)
