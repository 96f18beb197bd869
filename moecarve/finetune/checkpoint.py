"""Resumable checkpoints: trainable tensors, router biases, optimizer state, RNG state, step.

Each checkpoint is a folder `step-NNNNNN/` written atomically inside the checkpoint folder:
`state.safetensors` (tensors) and `state.json` (step, optimizer hyper-parameters, config).
Only the newest checkpoint is kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MoecarveError
from ..io.atomic import atomic_dir

_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(MoecarveError, ValueError):
    """A checkpoint that is missing or does not fit the model being trained."""


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ckpt_dir, or None."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name)) and (p / "state.json").exists()]
    return max(found)[1] if found else None


def save_checkpoint(ckpt_dir: str | Path, step: int, trainable: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, meta: dict) -> Path:  # fmt: skip
    """Write step-NNNNNN/ atomically, then delete older checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors |= {f"buffer.{k}": v.detach().cpu().contiguous() for k, v in buffers.items()}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    info = {"step": step, "param_groups": opt["param_groups"], **meta}
    target = ckpt_dir / f"step-{step:06d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(info, indent=2))
    for p in ckpt_dir.iterdir():
        if (m := _STEP_RE.match(p.name)) and int(m.group(1)) != step:
            shutil.rmtree(p, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path, trainable: dict[str, torch.nn.Parameter], buffers: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> dict:  # fmt: skip
    """Restore tensors, optimizer and RNG state in place from a step-NNNNNN/ folder; returns its json."""
    path = Path(path)
    info = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(trainable):
        missing, extra = sorted(set(trainable) - saved)[:3], sorted(saved - set(trainable))[:3]
        raise CheckpointError(f"checkpoint {path} does not fit this model/config (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(tensors[f"param.{k}"])
        for k, b in buffers.items():
            b.copy_(tensors[f"buffer.{k}"])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return info
