"""Saving a condensed model in the format its CondenseReport names."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..io.atomic import atomic_dir
from ..io.save import save
from .pipeline import MOECARVE, CondenseReport

REPORT_FILE = "condense_report.json"


def save_condensed(model: nn.Module, out_dir: str | Path, report: CondenseReport, tokenizer=None, carve_report=None,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Write `model` (condensed in place by condense / apply) to `out_dir` atomically, with
    condense_report.json beside the weights.

    report.format "moecarve": moecarve.save (config.json's `moecarve` entry, modeling_moecarve.py;
    load with moecarve.load or trust_remote_code). Otherwise the source architecture's own folder
    (plain `model.save_pretrained`), which transformers loads without moecarve.
    """
    extra = {REPORT_FILE: report.to_json()}
    if report.format == MOECARVE:
        return save(model, out_dir, tokenizer=tokenizer, report=carve_report, overwrite=overwrite, extra_files=extra)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
    return Path(out_dir)
