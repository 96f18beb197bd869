"""Sequential layer-by-layer propagation of calibration windows (as GPTQ / SparseGPT do).

The inputs of decoder layer l are the outputs of the already-carved layers 0..l-1, so each layer
is carved on what it will really see. Only one layer's activations are held at a time:
hidden states [N, L, d] plus that layer's FFN inputs [N * L, d] while it is carved.

The other arguments a layer is called with are captured for every layer, not only layer 0:
families that mix layer types (Gemma 2/3, Cohere 2, OLMo 3: sliding-window and full attention,
Gemma 3 also a local and a global rotary embedding) give each type its own mask and positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import adapters


class _Stop(Exception):
    """Raised by the last layer's recorder once every layer's arguments are captured."""


@dataclass
class LayerInputs:
    """What every decoder layer is called with: hidden states [N, L, d] + the shared arguments."""

    hidden: torch.Tensor  # [N, L, d]
    args: tuple  # positional arguments after hidden_states (usually empty)
    kwargs: dict  # attention mask, position ids / embeddings, ... of layer 0 (identical for every window)
    # (layer, its kwargs) for the layers called with other arguments than layer 0 (another layer type)
    layer_kwargs: list[tuple[nn.Module, dict]] = field(default_factory=list)

    def kwargs_for(self, layer: nn.Module) -> dict:
        """The keyword arguments `layer` is called with (its own where they differ from layer 0's)."""
        return next((kw for owner, kw in self.layer_kwargs if owner is layer), self.kwargs)


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


def _same(a, b) -> bool:
    """Whether two captured arguments are the same (the object itself, or equal tensors / values)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: treat as different, which is always safe
        return False


def _layer_kwargs(kwargs: dict) -> dict:
    """A layer's captured keyword arguments as run_layer passes them: no cache, hidden states apart."""
    out = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value", "layer_past")}
    out["use_cache"] = False
    return out


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, layers: nn.ModuleList | None = None
) -> LayerInputs:
    """Run the embeddings on each window [N, L] and capture what every decoder layer receives.

    `layers` is the decoder stack (default: where the adapter table says it is). Each layer's
    forward is replaced, for the call, by a recorder that passes the hidden states on unchanged and
    stops the model after the last layer: no layer computes anything (they may be on the meta device).
    """
    layers = adapters.decoder_layers(model) if layers is None else layers
    hidden: list[torch.Tensor] = []
    calls: list[tuple[tuple, dict] | None] = [None] * len(layers)

    def recorder(i: int):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                hidden.append(h)
            calls[i] = (args[1:], kwargs)
            if i == len(layers) - 1:
                raise _Stop
            return h  # the model's loop only passes it to the next recorder

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's device-map hooks
    outside = _non_layer_modules(model, layers)
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for m in outside:
            m.to(device)
        for w in windows:
            try:
                model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        for m, home in zip(outside, homes):
            if home.type != "meta":
                m.to(home)
    args, kwargs = calls[0]
    inputs = LayerInputs(hidden=torch.cat(hidden), args=args, kwargs=_layer_kwargs(kwargs))
    for layer, call in zip(list(layers)[1:], calls[1:]):  # positional arguments are shared (transformers passes none)
        own_kwargs = _layer_kwargs(call[1]) if call is not None else inputs.kwargs
        if not _same(own_kwargs, inputs.kwargs):
            inputs.layer_kwargs.append((layer, own_kwargs))
    return inputs


def _broadcasts(obj) -> bool:
    """Whether every tensor in the captured arguments has batch size 1 (or no batch dimension at
    all), so that they apply unchanged to several windows at once."""
    if isinstance(obj, torch.Tensor):
        return obj.dim() < 2 or obj.shape[0] == 1
    if isinstance(obj, (tuple, list)):
        return all(_broadcasts(o) for o in obj)
    if isinstance(obj, dict):
        return all(_broadcasts(o) for o in obj.values())
    return True


class _Captured(Exception):
    """Raised by run_layer's hook once the FFN input of a window is recorded (stop=True)."""


# Tokens per call of a decoder layer in run_layer: windows go through a layer several at a time
# (8 windows of 512 tokens per call instead of 8 calls), where the captured arguments (masks,
# positions, rotary tables: shape [1, ...]) broadcast over the windows; one window at a time
# otherwise. Larger GEMMs and fewer Python calls for the calibration passes.
TOKENS_PER_CALL = 4096


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device,
    capture: nn.Module | None = None,
    *,
    stop: bool = False,
    record: tuple[nn.Module, list] | None = None,
    replay: list[tuple[nn.Module, torch.Tensor | list]] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Propagate every window through one decoder layer on `device`.

    Returns (outputs [N, L, d] on the inputs' device, FFN inputs [N * L, d] on `device` or None).
    `capture` is the module whose input is recorded (the FFN, see adapters.ffn_input_module).
    stop: with `capture`, end each window's forward as soon as its FFN input is recorded (what
        runs after it, the FFN included, is not computed; the outputs are then None).
    record: (module, list): append what the module returns, call after call, to the list.
    replay: (module, source) pairs: each module returns, instead of computing it, its rows of a
        tensor source [N * L, ...] (window after window) or the next output of a list source (as
        `record` filled it). The source must be what the module computes on these very inputs (the
        carve computed the carved FFN's outputs while carving; a recorded pass saw the same
        inputs), so that only the rest of the layer runs again.

    Windows run TOKENS_PER_CALL tokens at a time when every captured argument has batch size 1
    (each window's result is what it would be alone: attention never mixes windows), else one by one.
    """
    if stop and capture is None:
        raise ValueError("stop=True ends each forward at the captured module's input: pass capture")
    seen: list[torch.Tensor] = []
    handles = []
    if capture is not None:

        def on_input(m, a):
            seen.append(a[0].reshape(-1, a[0].shape[-1]))
            if stop:
                raise _Captured

        handles.append(capture.register_forward_pre_hook(on_input))
    if record is not None:
        handles.append(record[0].register_forward_hook(lambda m, a, out: record[1].append(_detached(out))))
    played = [_Replayed(module, source) for module, source in replay or []]
    args, kwargs = _to(inputs.args, device), _to(inputs.kwargs_for(layer), device)
    n, seqlen = inputs.hidden.shape[:2]
    step = max(1, TOKENS_PER_CALL // seqlen) if _broadcasts((args, kwargs)) else 1
    out = None if stop else torch.empty_like(inputs.hidden)
    try:
        for p in played:
            p.install()
        with on_device(layer, device):
            for i in range(0, n, step):
                try:
                    y = layer(inputs.hidden[i : i + step].to(device), *args, **kwargs)
                except _Captured:
                    continue
                out[i : i + step] = (y[0] if isinstance(y, tuple) else y).to(out.device)
    finally:
        for handle in handles:
            handle.remove()
        for p in played:
            p.remove()
    for p in played:
        p.check()
    return out, (torch.cat(seen) if seen else None)


def _detached(obj):
    """A copy of a module's output (tensors detached and cloned: the layer may change them in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    return obj


class _Replayed:
    """A module whose instance forward, for one run_layer pass, hands back recorded results."""

    def __init__(self, module: nn.Module, source: torch.Tensor | list):
        self.module, self.source, self.used = module, source, 0

    def forward(self, *a, **kw):
        if isinstance(self.source, list):  # the next recorded output
            y = self.source[self.used]
            self.used += 1
            return y
        x = a[0] if a else next(iter(kw.values()))
        n = x.numel() // x.shape[-1]
        y = self.source[self.used : self.used + n]
        self.used += n
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def install(self) -> None:
        self.own = self.module.__dict__.get("forward")
        self.module.forward = self.forward

    def remove(self) -> None:
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own

    def check(self) -> None:
        total = len(self.source) if isinstance(self.source, list) else self.source.shape[0]
        if self.used != total:
            raise RuntimeError(f"replay: the layer used {self.used} of the {total} recorded results")
