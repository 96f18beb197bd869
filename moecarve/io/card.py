"""Model cards: the README.md of carved, condensed and exported folders, and provenance.

The Hub reads the YAML front matter (base_model, library_name, tags, pipeline_tag); people read the
table: what was carved from which model, how, on what calibration text, what it measured, which
versions wrote it, and how to load it. Everything a folder's config or report holds is read from
there; what only the caller knows (where the calibration text came from, perplexity before and
after) comes in a CardInfo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LOAD_SNIPPET = """```python
import moecarve
model = moecarve.load("{name}")  # moecarve's own modules; kernels="auto" for the fast paths
# or, without moecarve installed:
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # it reads the config class too
```"""

METHODS = {
    "cmoe": "cmoe: the CMoE paper's algorithm (activation-rate statistics, balanced k-means on activation "
    "markers, analytic router); training-free",
    "fitted": "fitted: neurons grouped by their |h| profiles, a router that tracks the oracle's choice, "
    "down_proj refit by ridge regression; training-free",
}


@dataclass
class CardInfo:
    """What a card says that the model and its report cannot know; the CLI (or the caller of
    moecarve.save) fills what it has, anything left None is left out of the card.

    source / revision: the source model's hub id or path and its revision (default: the
        provenance recorded in config.moecarve).
    calibration: where the calibration text came from, e.g. "calib.txt" or "the corpus shipped
        with moecarve" (its size comes from the carve report).
    eval_source / eval_seqlen: the perplexity test text and window length.
    ppl_before / ppl_after: perplexity of the source model and of the saved one on that text.
    notes: more lines for the card (e.g. a fine-tune's summary).
    """

    source: str | None = None
    revision: str | None = None
    calibration: str | None = None
    eval_source: str | None = None
    eval_seqlen: int | None = None
    ppl_before: float | None = None
    ppl_after: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, card: "CardInfo | dict | None") -> "CardInfo":
        """A CardInfo from a CardInfo, a dict of its fields, or None (an empty one)."""
        if card is None:
            return cls()
        return card if isinstance(card, cls) else cls(**card)


def versions() -> dict[str, str]:
    """The versions of moecarve, torch and transformers writing a folder."""
    import torch
    import transformers

    from .. import __version__

    return {"moecarve": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def local_source(source: str) -> bool:
    """Whether a source names a local folder (else a hub id)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~"))


def provenance(config, source: str | None = None, revision: str | None = None) -> dict:
    """Where a model comes from and what wrote it: {"source", "revision", "moecarve", "torch", "transformers"}.

    source: explicit, else the one recorded before (a re-saved carved model keeps its dense
    source), else the folder or hub id the model was loaded from, unless that is itself a
    moecarve folder. Local sources are recorded as absolute paths.
    """
    before = ((getattr(config, "moecarve", None) or {}).get("provenance")) or {}
    if source is None and before.get("source"):
        source, revision = before["source"], revision or before.get("revision")
    if source is None:
        loaded_from = getattr(config, "_name_or_path", "") or ""
        own = Path(loaded_from) / "config.json"
        if loaded_from and not (own.exists() and "moecarve" in json.loads(own.read_text())):
            source = loaded_from
    if source is not None and local_source(str(source)):
        source = str(Path(source).expanduser().resolve())
    revision = revision or getattr(config, "_commit_hash", None)
    return {"source": None if source is None else str(source), "revision": revision, **versions()}


def front_matter(source: str | None, tags: list[str]) -> str:
    """The YAML header the Hub reads; base_model only for a hub id (a local path is no model id)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=source if source and not local_source(source) else None)  # fmt: skip
    return f"---\n{data.to_yaml()}\n---\n"


def _table(rows: list[tuple[str, str]]) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731  (a "|" in a cell, as in |h|, would end it)
    return "\n".join(["| | |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in rows if v)])


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _source_rows(info: CardInfo, prov: dict) -> list[tuple[str, str]]:
    source = info.source or prov.get("source")
    revision = info.revision or prov.get("revision")
    return [("source model", f"`{source}`" + (f" (revision `{revision}`)" if revision else "") if source else "")]


def _quality_rows(info: CardInfo, n_windows: int | None, seqlen: int | None) -> list[tuple[str, str]]:
    rows = []
    calib = info.calibration or ("not recorded" if n_windows else "")
    if n_windows:
        calib += f", {n_windows} × {seqlen} tokens"
    rows.append(("calibration", calib))
    if info.ppl_after is not None:
        where = ", ".join(filter(None, [info.eval_source and f"`{info.eval_source}`", info.eval_seqlen and f"seq {info.eval_seqlen}"]))
        before = f"source {info.ppl_before:.3f} → " if info.ppl_before is not None else ""
        rows.append((f"perplexity ({where})" if where else "perplexity", f"{before}this model {info.ppl_after:.3f}"))
    return rows


def _versions_row(prov: dict) -> tuple[str, str]:
    names = ("moecarve", "torch", "transformers")
    return ("written by", ", ".join(f"{n} {prov[n]}" for n in names if prov.get(n)))


def _router(entry: dict) -> str:
    kind = entry.get("router", "analytic")
    return {
        "shadow": f"shadow: a {entry.get('shadow_bits')}-bit copy of the routed experts' input rows scores each expert by its |h| mass",
        "fitted": "fitted probe router (closed-form scores on x and a few probe neurons)",
        "analytic": "analytic (CMoE): one representative neuron per routed expert",
        "linear": "linear: softmax over a linear gate fitted on the calibration tokens",
    }.get(kind, kind)


def carved_card(config, name: str, report=None, info: CardInfo | dict | None = None) -> str:
    """README.md of a folder in moecarve's format (carved, fine-tuned or condensed).

    config: the model's config with its `moecarve` entry; report: its CarveReport, if any.
    """
    info = CardInfo.of(info)
    meta = config.moecarve
    prov = meta.get("provenance", {})
    carve, condense = meta.get("carve"), meta.get("condense")
    moes = [e for e in meta.get("modules", {}).values() if e.get("type", "moe") == "moe"]
    rows = _source_rows(info, prov)
    tags = ["moe", "mixture-of-experts", "moecarve"]
    if carve:
        n, s, a = carve["n_experts"], carve["n_shared"], carve["n_active"]
        m = f" of {moes[0]['expert_size']} neurons" if moes else ""
        rows += [
            ("configuration", f"S{s}A{a}E{n}: {n} experts{m} per FFN, {s} shared (always on) + {a} of {n - s} "
             f"routed per token = {(s + a) / n:.0%} of the FFN active"),
            ("method", METHODS.get(carve["method"], carve["method"])),
            ("router", _router(moes[0]) if moes else ""),
        ]  # fmt: skip
        tags += ["cmoe", carve["method"]]
    if condense:
        rows.append(("condensed (CD-MoE)", f"layers {condense.get('layers')} are dense MLPs: shared experts + "
                     f"{condense.get('n_experts')} routed experts always on, no router"))  # fmt: skip
        tags.append("cd-moe")
    if report is not None:
        rows.append(("parameters", f"{_params(report.params_total)} total, {_params(report.params_active)} active per token"))
    rows += _quality_rows(info, report.n_windows if report else None, report.seqlen if report else None)
    rows.append(_versions_row(prov))
    kind = "moecarve_" + config.model_type.removeprefix("moecarve_")
    what = "every FFN carved into a Mixture-of-Experts layer" if carve else "MoE layers condensed into dense layers"
    body = [
        f"# {name}\n",
        f"A model with {what} by moecarve (CMoE, arXiv 2502.04416; CD-MoE, arXiv 2412.00069), without pre-training.\n",
        _table(rows),
        *[f"\n{line}" for line in info.notes],
        "\n## Load\n",
        LOAD_SNIPPET.format(name=name),
        f"\nWithout `trust_remote_code=True`, transformers refuses this folder on purpose: its architecture "
        f"`{kind}` is defined in `modeling_moecarve.py`, a self-contained copy of moecarve's MoE module that "
        "imports only torch and transformers. `config.json`'s `moecarve` entry records every carved module, "
        "the settings and the provenance"
        + ("; `carve_report.json` holds the per-layer statistics, expert sizes and router load." if report else "."),
    ]
    return front_matter(info.source or prov.get("source"), sorted(set(tags), key=tags.index)) + "\n" + "\n".join(body) + "\n"


def plain_card(name: str, intro: str, rows: list[tuple[str, str]], tags: list[str], info: CardInfo | dict | None,
               prov: dict, n_windows: int | None = None, seqlen: int | None = None) -> str:  # fmt: skip
    """README.md of a folder that plain transformers loads (a condensed model saved in its own
    architecture, an export): intro, the rows given, calibration/perplexity, provenance."""
    info = CardInfo.of(info)
    rows = _source_rows(info, prov) + rows + _quality_rows(info, n_windows, seqlen) + [_versions_row(prov)]
    body = [
        f"# {name}\n",
        intro + "\n",
        _table(rows),
        *[f"\n{line}" for line in info.notes],
        "\n## Load\n",
        f'```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{name}")\n```',
    ]
    return front_matter(info.source or prov.get("source"), tags) + "\n" + "\n".join(body) + "\n"

