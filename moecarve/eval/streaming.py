"""Layer-by-layer perplexity: evaluate a model larger than memory with the streaming loader.

All windows go through decoder layer 0, then layer 1, ... (only one layer is materialised at a
time, read from disk by moecarve.stream.StreamedModel); the final hidden states [n, L, d] are
then fed, window by window, through the model's own head (final norm, LM head, any logit
soft-capping) by replaying them in place of the decoder stack. The NLL is the protocol of
moecarve.eval.perplexity: sum over every predicted token, exp of the mean.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import adapters
from ..capture import _non_layer_modules, first_layer_inputs, run_layer
from ..stream.skeleton import InMemoryLayers, StreamedModel


class _Replay(nn.Module):
    """Stands in for the whole decoder stack: returns the stored final hidden states [1, L, d]."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple  # whether this architecture's decoder layers return tuples
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextmanager
def _replaying(model: nn.Module, replay: _Replay):
    """Temporarily swap the decoder stack for one _Replay module."""
    path = adapters.adapter_for(model).layers
    layers = model.get_submodule(path)
    model.set_submodule(path, nn.ModuleList([replay]))
    try:
        yield
    finally:
        model.set_submodule(path, layers)


@contextmanager
def _outside_on(model: nn.Module, device: torch.device):
    """Move the modules outside the decoder stack to `device` for the block (as first_layer_inputs)."""
    outside = _non_layer_modules(model, adapters.decoder_layers(model))
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    try:
        for m in outside:
            m.to(device)
        yield
    finally:
        for m, home in zip(outside, homes):
            m.to(home)


@torch.no_grad()
def layerwise_perplexity(
    path_or_model: str | Path | nn.Module,
    windows: torch.Tensor,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    activations_device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over windows [n, seqlen], one decoder layer in memory at a time.

    Args:
        path_or_model: a local model folder (dense or carved; streamed from its safetensors) or a
            model in memory (its layers visit `device` one at a time).
        windows: token windows [n, seqlen] (see eval.perplexity.test_windows).
        device: where each layer runs (default: CUDA when available).
        dtype: compute dtype when streaming from a folder.
        activations_device: where the hidden states [n, seqlen, d] wait between layers.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(path_or_model, nn.Module):
        source = InMemoryLayers(path_or_model, device)
    else:
        source = StreamedModel(path_or_model, dtype, device, allow_pickle)
        source.load_outside()
    model = source.model
    was_training = model.training
    model.eval()
    try:
        inputs = first_layer_inputs(model, windows, device)
        inputs.hidden = inputs.hidden.to(activations_device)
        returns_tuple = [False]
        for i in tqdm(range(len(source.layers)), desc="layers", disable=not progress):
            with source.layer(i) as layer:
                hook = layer.register_forward_hook(lambda m, a, out: returns_tuple.__setitem__(0, isinstance(out, tuple)))
                try:
                    inputs.hidden, _ = run_layer(layer, inputs, device)
                finally:
                    hook.remove()
        replay = _Replay(returns_tuple[0])
        nll, count = 0.0, 0
        with _replaying(model, replay), _outside_on(model, device):
            for w in range(windows.shape[0]):
                ids = windows[w : w + 1].to(device)
                replay.hidden = inputs.hidden[w : w + 1].to(device)
                logits = model(input_ids=ids, use_cache=False).logits.float()  # [1, L, V]
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                nll += loss.item()
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
