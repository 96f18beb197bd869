"""Recover quality after carving: a short LoRA fine-tune (CMoE's second half).

    report = moecarve.finetune(model, moecarve.FinetuneConfig(epochs=1), windows, eval_windows=held_out)
    moecarve.save(model, "out/finetuned", tokenizer=tok)   # adapters are merged: an ordinary carved folder

or keep the adapter alone (PEFT's format) and apply it later:

    moecarve.finetune(model, cfg, windows, merge=False)
    save_adapter(model, "out/adapter", cfg, base_model="out/carved")
    model = load_adapter("out/carved", "out/adapter")          # merged again

`lora_config(model)` is the PEFT LoraConfig that reaches the stacked experts (target_parameters),
for training with PEFT alone.
"""

from .adapter import AdapterError, load_adapter, save_adapter
from .checkpoint import CheckpointError
from .config import FinetuneConfig
from .lora import lora_config, merge_lora
from .train import FinetuneError, FinetuneReport, finetune

__all__ = ["AdapterError", "CheckpointError", "FinetuneConfig", "FinetuneError", "FinetuneReport", "finetune",
           "load_adapter", "lora_config", "merge_lora", "save_adapter"]  # fmt: skip
