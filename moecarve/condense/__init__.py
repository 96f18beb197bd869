"""Condense (CD-MoE): shrink MoE layers with shared experts into small dense layers, training-free.

    report = moecarve.condense(model, moecarve.CondenseConfig(n_layers=2, n_experts=2), windows)
    moecarve.save(model, "out/condensed", tokenizer=tok)
"""

from .config import CondenseConfig, CondenseError
from .families import FAMILIES, UnsupportedMoE
from .pipeline import CondensePlan, CondenseReport, LayerStep, apply, condense, model_bytes, plan

__all__ = ["FAMILIES", "CondenseConfig", "CondenseError", "CondensePlan", "CondenseReport", "LayerStep",
           "UnsupportedMoE", "apply", "condense", "model_bytes", "plan"]  # fmt: skip
