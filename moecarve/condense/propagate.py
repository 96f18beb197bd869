"""Run calibration windows through the decoder stack of any model, one layer at a time.

Like moecarve.capture (which it reuses), but the decoder layers are found from where the MoE
modules sit, so it works for architectures the dense adapters do not list (Qwen2-MoE, DeepSeek...).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import capture
from ..capture import LayerInputs
from .config import CondenseError


def decoder_layers(model: nn.Module, moe_path: str) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder stack holding the MoE module at `moe_path`."""
    parts = moe_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        if parts[i].isdigit() and isinstance(parent, nn.ModuleList):
            return ".".join(parts[:i]), parent
    raise CondenseError(f"cannot find the decoder layer list holding {moe_path}")


def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor) -> LayerInputs:
    """Embed each window [N, L] and capture what layer 0 receives (hidden [N, L, d] + arguments)."""
    return capture.first_layer_inputs(model, windows, next(model.parameters()).device, layers=layers)


@torch.no_grad()
def run_layer(
    layer: nn.Module, inputs: LayerInputs, hidden: torch.Tensor, moe: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Propagate hidden [N, L, d] through one decoder layer (with `inputs`' shared arguments).

    Returns (outputs [N, L, d], the MoE module's inputs [N*L, d], its outputs [N*L, d]); the last
    two are None when `moe` is None.
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    handle = None
    if moe is not None:

        def hook(m, args, out):
            xs.append(args[0].reshape(-1, args[0].shape[-1]))
            ys.append(out.reshape(-1, out.shape[-1]))

        handle = moe.register_forward_hook(hook)
    out = torch.empty_like(hidden)
    try:
        for i in range(hidden.shape[0]):
            y = layer(hidden[i : i + 1], *inputs.args, **inputs.kwargs_for(layer))
            out[i] = y[0] if isinstance(y, tuple) else y
    finally:
        if handle is not None:
            handle.remove()
    if moe is None:
        return out, None, None
    return out, torch.cat(xs), torch.cat(ys)
