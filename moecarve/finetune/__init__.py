"""Recover quality after carving: a short LoRA fine-tune (CMoE's second half).

    report = moecarve.finetune(model, moecarve.FinetuneConfig(epochs=1), windows, eval_windows=held_out)
    moecarve.save(model, "out/finetuned", tokenizer=tok)   # adapters are merged: an ordinary carved folder
"""

from .checkpoint import CheckpointError
from .config import FinetuneConfig
from .lora import merge_lora
from .train import FinetuneError, FinetuneReport, finetune

__all__ = ["CheckpointError", "FinetuneConfig", "FinetuneError", "FinetuneReport", "finetune", "merge_lora"]
