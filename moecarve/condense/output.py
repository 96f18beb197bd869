"""Saving a condensed model in the format its CondenseReport names, with a model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from ..io.atomic import atomic_dir
from ..io.card import CardInfo, plain_card, provenance
from ..io.save import CARD_FILE, ordinary_permissions, save
from .pipeline import MOECARVE, CondenseReport

REPORT_FILE = "condense_report.json"


def _summary(report: CondenseReport) -> str:
    """One card line: what was condensed, on what, and what it saved."""
    return (f"Condensed (CD-MoE) on {report.n_windows} × {report.seqlen} calibration tokens: layers {report.layers} "
            f"keep their shared experts and {report.config.n_experts} routed experts always on, without a router; "
            f"parameters {report.params_before / 1e6:.1f}M → {report.params_after / 1e6:.1f}M.")  # fmt: skip


def save_condensed(model: nn.Module, out_dir: str | Path, report: CondenseReport, tokenizer=None, carve_report=None,
                   overwrite: bool = False, card: CardInfo | dict | None = None) -> Path:  # fmt: skip
    """Write `model` (condensed in place by condense / apply) to `out_dir` atomically, with
    condense_report.json beside the weights and a model card (README.md).

    report.format "moecarve": moecarve.save (config.json's own model_type and `moecarve` entry,
    modeling_moecarve.py; load with moecarve.load or trust_remote_code). Otherwise the source
    architecture's own folder (plain `model.save_pretrained`), which transformers loads without
    moecarve. card: what the card should say beyond the reports (see moecarve.io.card.CardInfo).
    """
    info = CardInfo.of(card)
    info = replace(info, notes=[*info.notes, _summary(report)])
    extra = {REPORT_FILE: report.to_json()}
    if report.format == MOECARVE:
        return save(model, out_dir, tokenizer=tokenizer, report=carve_report, overwrite=overwrite, extra_files=extra, card=info)
    name = Path(out_dir).name
    intro = (f"A {report.format} model with MoE layers condensed into dense layers by moecarve (CD-MoE, arXiv 2412.00069), "
             f"saved in its own architecture ({report.format_reason}): plain transformers loads it.")  # fmt: skip
    text = plain_card(name, intro, [], ["moe", "moecarve", "cd-moe", report.format], info,
                      provenance(model.config, info.source, info.revision))  # fmt: skip
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file, body in {**extra, CARD_FILE: text}.items():
            (tmp / file).write_text(body)
        ordinary_permissions(tmp)
    return Path(out_dir)
