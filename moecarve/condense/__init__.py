"""Condense (CD-MoE): shrink MoE layers into small dense layers (shared experts + R always-on routed
experts, no router), training-free, with an optional fine-tune of the condensed layers only.

    report = moecarve.condense(model, moecarve.CondenseConfig(n_layers=2, n_experts=2), windows)
    save_condensed(model, "out/condensed", report, tokenizer=tok)   # report.format says which format
"""

from .config import CondenseConfig, CondenseError
from .families import FAMILIES, UnsupportedMoE
from .output import save_condensed
from .pipeline import MOECARVE as MOECARVE_SAVE_FORMAT
from .pipeline import (CondensePlan, CondenseReport, LayerStep, apply, condense, finetune_condensed, model_bytes,
                       native_format_reason, plan)  # fmt: skip
from .tune import TuneReport

__all__ = ["FAMILIES", "MOECARVE_SAVE_FORMAT", "CondenseConfig", "CondenseError", "CondensePlan", "CondenseReport",
           "LayerStep", "TuneReport", "UnsupportedMoE", "apply", "condense", "finetune_condensed", "model_bytes",
           "native_format_reason", "plan", "save_condensed"]  # fmt: skip
