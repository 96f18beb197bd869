"""A model whose decoder layers stay on disk until used: the loader shared by streamed carving
and layer-by-layer evaluation.

The skeleton is built on the meta device (`accelerate.init_empty_weights`: parameters take no
memory; buffers such as rotary `inv_freq` are computed for real, since they are not saved).
The modules outside the decoder stack (embeddings, final norm, LM head) are read once; each
decoder layer is read when asked for and emptied again (back to meta) afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from .. import adapters
from ..capture import on_device
from ..io.remote import carved_class
from ..io.save import model_config
from .checkpoint import Checkpoint


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to `module`) by `value`."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[leaf] = value


def empty_module(module: nn.Module, names: Iterable[str] | None = None) -> None:
    """Free the saved tensors `names` of `module` (default: all of them) back to meta;
    non-persistent buffers are kept."""
    state = module.state_dict(keep_vars=True)
    for name in state if names is None else names:
        set_tensor(module, name, torch.empty_like(state[name], device="meta"))


def layers_prefix(model: nn.Module) -> str:
    """"model.layers" for LLaMA-like models: the state-dict prefix of the decoder stack."""
    return adapters.adapter_for(model).layers


def outside_state_names(model: nn.Module) -> list[str]:
    """State-dict names outside the decoder stack, tied duplicates removed as save_pretrained does."""
    prefix = layers_prefix(model) + "."
    seen: set[int] = set()
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix) or id(t) in seen:
            continue
        seen.add(id(t))
        names.append(name)
    return names


def saved_names(model: nn.Module) -> dict[str, str]:
    """Model tensor name -> the name save_pretrained writes it under, where transformers renames it
    on saving (Gemma 3 with its vision tower: model.language_model.* is saved as language_model.model.*)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers that saves every tensor under its own name
        return {}
    # one distinct placeholder per name: tied tensors share one object and would lose a name
    placeholders = {name: torch.empty(0, device="meta") for name in model.state_dict(keep_vars=True)}
    renamed = {id(t): saved for saved, t in revert_weight_conversion(model, dict(placeholders)).items()}
    return {name: renamed[id(t)] for name, t in placeholders.items() if renamed.get(id(t), name) != name}


def build_skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of `folder` (dense or carved) with every parameter on the meta device, eval mode."""
    config = model_config(folder)
    meta = getattr(config, "moecarve", None)
    with init_empty_weights():
        if meta:
            model = carved_class(meta["base_class"])._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


class StreamedModel:
    """A skeleton plus its checkpoint; decoder layers are materialised one at a time.

    Args:
        folder: a local model folder with safetensors weights (see Checkpoint).
        dtype: the compute dtype every tensor is cast to (as from_pretrained(dtype=...) does).
        device: where materialised modules live while used.
        allow_pickle: accept pytorch_model*.bin checkpoints.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device, allow_pickle: bool = False):
        self.checkpoint = Checkpoint(folder, allow_pickle)  # fails before any work on a bad folder
        self.model = build_skeleton(folder, dtype)
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = adapters.decoder_layers(self.model)
        self._prefix = layers_prefix(self.model)
        self._saved = saved_names(self.model)
        self._check_names()

    def _key(self, name: str) -> str:
        """The checkpoint's name for model tensor `name` (tolerates a missing/extra base prefix, and
        the names transformers saves some families under)."""
        if name in self.checkpoint:
            return name
        if self._saved.get(name) in self.checkpoint:
            return self._saved[name]
        base = getattr(self.model, "base_model_prefix", "")
        for alt in (name.removeprefix(base + "."), f"{base}.{name}"):
            if alt in self.checkpoint:
                return alt
        return name

    def _check_names(self) -> None:
        """Every saved model tensor must be in the checkpoint: fail now, not at layer 40."""
        buffers = {n for n, _ in self.model.named_buffers()}  # computed buffers may be absent
        missing = [
            n for n in outside_state_names(self.model) + [f"{self._prefix}.{i}.{k}" for i, layer in enumerate(self.layers) for k in layer.state_dict()]
            if self._key(n) not in self.checkpoint and n not in buffers
        ]  # fmt: skip
        if missing:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"{self.checkpoint.folder}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")

    def read(self, name: str) -> torch.Tensor:
        """Model tensor `name` from disk, in the compute dtype when floating point (CPU)."""
        t = self.checkpoint.get(self._key(name))
        return t.to(self.dtype) if t.is_floating_point() else t

    def _load(self, module: nn.Module, prefix: str, names: set[str] | None = None) -> None:
        """Read `module`'s saved tensors `names` (default: all) from the checkpoint onto the device,
        then unmap the checkpoint (read pages would otherwise add up to the whole file)."""
        for name, old in module.state_dict(keep_vars=True).items():
            key = prefix + name
            if names is not None and name not in names:
                continue
            if self._key(key) in self.checkpoint:
                set_tensor(module, name, self.read(key).to(self.device))
            elif old.device.type != "meta":  # a persistent buffer the checkpoint does not hold
                set_tensor(module, name, old.to(self.device))
        self.checkpoint.close()

    def load_outside(self) -> None:
        """Materialise the modules outside the decoder stack (embeddings, final norm, LM head)."""
        self._load(self.model, "", set(outside_state_names(self.model)))
        self.model.tie_weights()  # re-point tied LM heads at the loaded embeddings
        for name, b in list(self.model.named_buffers()):  # computed buffers (rotary) follow the device
            if not name.startswith(self._prefix + "."):
                set_tensor(self.model, name, b.to(self.device))

    def empty_outside(self) -> None:
        """Free the modules outside the decoder stack again (back to meta; computed buffers stay).

        Tied duplicates (a tied LM head) are emptied too, else they would keep the embeddings alive.
        """
        prefix = self._prefix + "."
        empty_module(self.model, [n for n in self.model.state_dict(keep_vars=True) if not n.startswith(prefix)])
        self.model.tie_weights()  # tied parameters stay one parameter (parameter counts see it once)

    @contextmanager
    def layer(self, i: int):
        """Decoder layer i, read from disk onto the device for the block, emptied afterwards."""
        layer = self.layers[i]
        self._load(layer, f"{self._prefix}.{i}.")
        try:
            yield layer
        finally:
            empty_module(layer)

    @contextmanager
    def parked(self, i: int, keep: list[torch.Tensor]):
        """For the block, free layer i's tensors except those sharing storage with `keep` (the FFN
        being carved), then read them back from disk: the carve's peak then holds the FFN, not the
        whole layer. On an exception nothing is read back (the layer is emptied anyway)."""
        layer = self.layers[i]
        prefix = f"{self._prefix}.{i}."
        held = {t.untyped_storage().data_ptr() for t in keep}
        parked = {
            name for name, t in layer.state_dict(keep_vars=True).items()
            if t.device.type != "meta" and t.untyped_storage().data_ptr() not in held and self._key(prefix + name) in self.checkpoint
        }  # fmt: skip
        empty_module(layer, parked)
        yield
        self._load(layer, prefix, parked)


class InMemoryLayers:
    """The same interface over a model already in memory: each layer visits the device in turn."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, torch.device(device)
        self.layers = adapters.decoder_layers(model)

    def load_outside(self) -> None:
        pass  # first_layer_inputs moves the outside modules to the device and back itself

    @contextmanager
    def layer(self, i: int):
        with on_device(self.layers[i], self.device) as layer:
            yield layer
