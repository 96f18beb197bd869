"""Step 3 of CD-MoE: choose which MoE layers to condense, greedily (with an optional beam).

Grow the set of condensed layers one at a time, each time adding the layer whose condensation
minimises the JS divergence between the original and the condensed model's final hidden states
(the last decoder layer's output, softmax over the hidden dimension, averaged over tokens).

What is cached (the reference code reruns the whole model for every candidate): every decoder
layer's input under the current state's condensation. A candidate layer l then runs only layers
l..L-1, starting from the cached input of layer l; the layers it runs yield the inputs cached by
the state it becomes, so accepting it costs nothing more.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import LayerInputs
from .divergence import js_divergence
from .propagate import run_layer


@dataclass
class SearchState:
    """A set of condensed layers (decoder indices, in the order added) and what it leaves behind."""

    chosen: tuple[int, ...] = ()
    js: list[float] = field(default_factory=list)  # final-hidden JS after each addition
    inputs: list[torch.Tensor] = field(default_factory=list)  # [L] inputs [N, seq, d] of every decoder layer


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]):
    """Install modules (dotted path -> module) for the duration of the block, then restore."""
    old = {path: model.get_submodule(path) for path in modules}
    try:
        for path, mod in modules.items():
            model.set_submodule(path, mod)
        yield
    finally:
        for path, mod in old.items():
            model.set_submodule(path, mod)


@torch.no_grad()
def _evaluate(model, layers, args: LayerInputs, state: SearchState, layer: int, condensed: dict[int, tuple[str, nn.Module]],
              final_ref: torch.Tensor) -> tuple[float, list[torch.Tensor]]:  # fmt: skip
    """JS of the final hidden states with state.chosen + [layer] condensed, and the new input cache."""
    chosen = set(state.chosen) | {layer}
    install = {condensed[j][0]: condensed[j][1] for j in chosen if j >= layer}
    inputs = list(state.inputs[: layer + 1])
    h = inputs[layer]
    with swapped(model, install):
        for j in range(layer, len(layers)):
            if j > layer:
                inputs.append(h)
            h, _, _ = run_layer(layers[j], args, h)
    return js_divergence(final_ref, h), inputs


@torch.no_grad()
def search_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    args: LayerInputs,
    inputs: list[torch.Tensor],
    final_ref: torch.Tensor,
    condensed: dict[int, tuple[str, nn.Module]],
    n_layers: int,
    beam: int = 1,
    progress: bool = False,
) -> SearchState:
    """The best state after adding n_layers of the candidate layers `condensed` (index -> (path, module)).

    inputs: the original model's input [N, seq, d] of every decoder layer; final_ref: its final
    hidden states. Ties go to the lexicographically smaller sequence of layer indices.
    """
    states = [SearchState(inputs=list(inputs))]
    bar = tqdm(total=n_layers, desc="choosing layers", unit="layer", disable=not progress)
    for _ in range(n_layers):
        seen: set[frozenset] = set()
        best: list[tuple[float, tuple[int, ...], SearchState]] = []
        for st in states:
            for layer in sorted(condensed):
                if layer in st.chosen or frozenset(st.chosen + (layer,)) in seen:
                    continue
                seen.add(frozenset(st.chosen + (layer,)))
                js, cache = _evaluate(model, layers, args, st, layer, condensed, final_ref)
                key = st.chosen + (layer,)
                if len(best) < beam or (js, key) < best[-1][:2]:
                    best.append((js, key, SearchState(chosen=key, js=st.js + [js], inputs=cache)))
                    best.sort(key=lambda t: t[:2])
                    del best[beam:]  # drop the caches of states pushed out of the beam
        states = [b[2] for b in best]
        bar.update(1)
    bar.close()
    return states[0]
