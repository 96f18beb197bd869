"""`carve_streamed`: carve a model larger than memory, one decoder layer at a time.

Only one decoder layer and the calibration activations are in memory at once (the embeddings
only while the windows are embedded). For each layer: read its tensors from the checkpoint, carve
it with `moecarve.carve.carve_layer` (the very step the in-memory carve runs, so the output is
bit-identical; while its FFN is carved the rest of the layer waits on disk, StreamedModel.parked),
write the carved layer to disk, free it, and hand the freed memory back to the OS
(moecarve.stream.memory: glibc would otherwise keep it resident).

Resumable state lives in the sibling folder `OUT.partial/` while the carve runs:
    state.json                 what was carved so far + a fingerprint of the inputs
    outside.safetensors        the tensors outside the decoder stack (embeddings, norm, head)
    layer-00000.safetensors    carved decoder layer 0 (model state-dict names), one file per layer
    hidden.safetensors         calibration hidden states after the last finished layer [N, L, d]
On success the final folder `OUT` is assembled atomically (sharded like save_pretrained) and
`OUT.partial/` is removed. After a crash `OUT` does not exist; `OUT.partial/` stays so that
`resume=True` (`--resume`) continues after the last finished layer, unless keep_partial=False.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import adapters
from ..capture import LayerInputs, first_layer_inputs
from ..carve import MOECARVE_FORMAT, CarveReport, carve_layer, count_params, default_device, module_entry, validate
from ..carving.methods import LayerReport
from ..config import CarveConfig
from ..errors import MoecarveError
from ..io.atomic import atomic_dir, check_output
from ..io.card import CardInfo
from ..io.save import base_class_name, finish_folder, record_provenance
from .memory import map_large_allocations, release_freed_memory
from .shards import parse_size, write_shards
from .skeleton import StreamedModel, empty_module, outside_state_names

STATE_FILE = "state.json"
OUTSIDE_FILE = "outside.safetensors"
HIDDEN_FILE = "hidden.safetensors"


class ResumeError(MoecarveError, RuntimeError):
    """Partial state that cannot be used (left by another run, or absent when it must not be)."""


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished carve of `out` keeps its resumable state."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".partial")


def layer_file(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def fingerprint(model_path: str | Path, cfg: CarveConfig, windows: torch.Tensor, dtype: torch.dtype) -> dict:
    """What must be equal for partial state to be reused."""
    return {
        "model": str(Path(model_path).resolve()),
        "carve": cfg.to_dict(),
        "windows_sha256": hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest(),
        "windows_shape": list(windows.shape),
        "dtype": str(dtype),
    }


def _open_state(part: Path, fp: dict, resume: bool, overwrite: bool) -> dict:
    """Fresh or resumed state; never silently discards someone's finished layers."""
    state_path = part / STATE_FILE
    if part.exists() and state_path.exists() and resume:
        state = json.loads(state_path.read_text())
        if state["fingerprint"] != fp:
            raise ResumeError(
                f"{part} was left by a carve with other inputs (model, config, calibration or dtype); "
                "remove it or rerun without --resume and with --overwrite to start over"
            )
        return state
    if part.exists() and not overwrite and state_path.exists():
        raise ResumeError(f"{part} holds an unfinished carve: pass --resume to continue it or --overwrite to start over")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    return {"fingerprint": fp, "done": 0, "layers": [], "modules": {}, "params_layers": 0, "inactive": 0, "seconds": 0.0}


@torch.no_grad()
def carve_streamed(
    model_path: str | Path,
    config: CarveConfig,
    calibration: torch.Tensor,
    out: str | Path,
    *,
    tokenizer=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    activations_device: torch.device | str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    keep_partial: bool = True,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    tune_allocator: bool = True,
    card: CardInfo | dict | None = None,
) -> CarveReport:
    """Carve the model folder `model_path` layer by layer into the carved folder `out`.

    Args:
        model_path: a local model folder with safetensors weights.
        config / calibration: as for moecarve.carve (calibration: LongTensor [n_samples, seqlen]);
            score_weight "fisher" carves as "down" (the Fisher pass needs the whole model).
        out: output folder, written atomically; `moecarve.load(out)` reads it.
        tokenizer: saved into `out` when given.
        device: where each layer is carved (default: CUDA when available).
        dtype: compute dtype; the checkpoint's tensors are cast to it and saved in it.
        activations_device: where the calibration hidden states [N, L, d] wait between layers.
        resume: continue from `OUT.partial/` after a crash (same inputs required).
        keep_partial: keep `OUT.partial/` after a failure so that it can be resumed.
        allow_pickle: accept pytorch_model*.bin checkpoints.
        max_shard_size: largest output shard ("5GB", "500MB" or bytes).
        tune_allocator: on glibc, serve every allocation of 1 MiB or more with its own mmap from
            now on, for the rest of the process (moecarve.stream.memory.map_large_allocations),
            so that freed tensors leave the RSS at once: it keeps the peak at what one layer
            needs (otherwise 100-200 MiB more at hidden 1536, growing with the layers) for
            ~15% more time on a "cmoe" carve (page faults). False leaves the allocator as it is.
        card: what the model card should say beyond the config and report (see moecarve.save);
            its source defaults to `model_path`.
    Returns:
        the CarveReport, also saved as carve_report.json in `out`.
    """
    t0 = time.perf_counter()
    if config.fisher_pass:  # it runs the whole model backward: a streamed carve cannot
        config = config.replace(score_weight="down")
    check_output(out, overwrite)
    if tune_allocator:  # first: building the skeleton frees a ~280 MiB block into the heap, which later tensors would fragment
        map_large_allocations()
    device = torch.device(device) if device is not None else default_device()
    src = StreamedModel(model_path, dtype, device, allow_pickle)  # fails on a bad folder before any work
    model = src.model
    validate(model, config, calibration)
    parse_size(max_shard_size)  # a bad size fails now, not after the last layer
    part = partial_dir(out)
    state = _open_state(part, fingerprint(model_path, config, calibration, dtype), resume, overwrite)
    try:
        report = _carve_layers(src, config, calibration, part, state, device, activations_device, progress)
        report.seconds = state["seconds"] + (time.perf_counter() - t0)
        info = CardInfo.of(card)
        info = info if info.source else replace(info, source=str(model_path))
        _finish(src, config, report, state, part, out, tokenizer, overwrite, max_shard_size, info)
    except BaseException:
        if not keep_partial:
            shutil.rmtree(part, ignore_errors=True)
        raise
    shutil.rmtree(part, ignore_errors=True)
    return report


def _carve_layers(src: StreamedModel, cfg, calibration, part: Path, state: dict, device, act_device, progress) -> CarveReport:
    model = src.model
    layers = src.layers
    report = CarveReport(config=cfg, n_windows=calibration.shape[0], seqlen=calibration.shape[1],
                         params_dense=sum(p.numel() for p in model.parameters()))  # fmt: skip
    report.layers = [LayerReport(**r) for r in state["layers"]]
    start = state["done"]
    inputs = _first_inputs(src, calibration, part, start, device, act_device)
    bar = tqdm(range(start, len(layers)), desc=f"carving {cfg.name} (streamed)", unit="layer", disable=not progress)
    for i in bar:
        t_layer = time.perf_counter()
        with src.layer(i):
            park = functools.partial(src.parked, i)  # the attention waits on disk while the FFN is carved
            installed, layer_report = carve_layer(model, i, inputs, cfg, device, park=park)  # as moecarve.carve does
            prefix = f"{src._prefix}.{i}."
            _save_atomic({prefix + k: v for k, v in layers[i].state_dict().items()}, part / layer_file(i))
            n_params, active = count_params(layers[i])
            empty_module(layers[i])  # the carved layer is on disk now
        _save_atomic({"hidden": inputs.hidden}, part / HIDDEN_FILE)
        release_freed_memory()  # else the heap keeps this layer's freed temporaries resident
        layer_report.seconds = time.perf_counter() - t_layer
        report.layers.append(layer_report)
        state["layers"].append(asdict(layer_report))
        state["modules"].update({path: module_entry(m) for path, m in installed.items()})
        state["params_layers"] += n_params
        state["inactive"] += n_params - active
        state["done"] = i + 1
        state["seconds"] += layer_report.seconds
        _write_json_atomic(state, part / STATE_FILE)  # last: the layer counts as done only now
        bar.set_postfix(load=f"{layer_report.load_imbalance:.2f}")
    outside_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(src._prefix + "."))
    report.params_total = outside_params + state["params_layers"]
    report.params_active = report.params_total - state["inactive"]
    return report


def _first_inputs(src: StreamedModel, calibration, part: Path, start: int, device, act_device) -> LayerInputs:
    """The inputs of layer `start`: embeds the windows (cheap, so redone on resume), saves the
    tensors outside the decoder stack once, then frees those modules (not needed by the layers).

    Returns LayerInputs with hidden [N, L, d] on act_device.
    """
    model = src.model
    src.load_outside()
    if not (part / OUTSIDE_FILE).exists():
        state = model.state_dict()  # the tensors just loaded: no second read from disk
        _save_atomic({n: state[n] for n in outside_state_names(model)}, part / OUTSIDE_FILE)
        del state
    inputs = first_layer_inputs(model, calibration, device)
    src.empty_outside()  # the embeddings are not needed again: keep them out of every layer's peak
    if start:
        inputs.hidden = load_file(str(part / HIDDEN_FILE))["hidden"]
    inputs.hidden = inputs.hidden.to(act_device)
    release_freed_memory()
    return inputs


def _finish(src: StreamedModel, cfg, report, state, part: Path, out, tokenizer, overwrite, max_shard_size, card: CardInfo) -> None:
    """Assemble the final folder as moecarve.io.save.save writes it (same config.json, card and files)."""
    model = src.model
    config = model.config
    config.moecarve = {"format": MOECARVE_FORMAT, "carve": cfg.to_dict(), "modules": state["modules"]}
    record_provenance(config, base_class_name(model), card)
    config.dtype = src.dtype
    sources = [part / OUTSIDE_FILE] + [part / layer_file(i) for i in range(len(src.layers))]
    with atomic_dir(out, overwrite) as tmp:
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        write_shards(sources, tmp, max_shard_size)
        finish_folder(tmp, config, Path(out).name, tokenizer, report, card)
