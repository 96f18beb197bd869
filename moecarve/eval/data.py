"""Perplexity test sets: WikiText-2 raw (test), C4 (validation) or a local text / dataset folder.

Named sets come only from the local Hugging Face `datasets` cache (offline mode is forced while
they load): moecarve never downloads evaluation data by itself. A set that is not there fails
with an EvalDataError that says how to provide it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..calibration import read_text_file
from ..errors import MoecarveError

DOC_SEPARATOR = "\n\n"


class EvalDataError(MoecarveError, FileNotFoundError):
    """An evaluation text that is missing, unreadable or empty."""


@dataclass(frozen=True)
class NamedSet:
    """A standard perplexity test set as `datasets.load_dataset` names it."""

    title: str
    path: str
    name: str | None
    split: str
    data_files: dict | None = None
    max_docs: int | None = None  # C4: the first 1100 validation documents, as GPTQ / SparseGPT / Wanda


NAMED_SETS = {
    "wikitext2": NamedSet("WikiText-2 raw (test)", "Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "c4": NamedSet("C4 en (validation, first 1100 documents)", "allenai/c4", None, "validation",
                   data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, max_docs=1100),
}  # fmt: skip


@contextmanager
def _offline():
    """Force huggingface_hub / datasets offline (they read the env vars only at import time)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def join_documents(docs) -> str:
    """The documents of a test split joined with a blank line (empty ones skipped)."""
    return DOC_SEPARATOR.join(d for d in docs if d)


def _from_named(key: str) -> str:
    import datasets

    s = NAMED_SETS[key]
    try:
        with _offline():
            ds = datasets.load_dataset(s.path, s.name, split=s.split, data_files=s.data_files)
    except Exception as e:  # datasets raises many types for "not cached"; all mean the same here
        cache = datasets.config.HF_DATASETS_CACHE
        fetch = f"datasets.load_dataset({s.path!r}, {s.name!r}, split={s.split!r}" + (
            f", data_files={s.data_files!r})" if s.data_files else ")"
        )
        raise EvalDataError(
            f"{s.title} is not in the local datasets cache ({cache}); moecarve does not download it. "
            f"Either pass a local file or folder (--ppl PATH.txt, or a folder written by Dataset.save_to_disk "
            f"with a 'text' column), or fill the cache once on a machine with network access: "
            f"python -c \"import datasets; {fetch}\" ({type(e).__name__})"
        ) from e
    docs = ds["text"] if s.max_docs is None else ds.select(range(min(s.max_docs, len(ds))))["text"]
    return join_documents(docs)


def _from_folder(path: Path) -> str:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise EvalDataError(f"{path} is not a folder written by datasets' save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        split = next((k for k in ("test", "validation", "train") if k in ds), next(iter(ds)))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise EvalDataError(f"dataset {path} has no 'text' column (columns: {ds.column_names})")
    return join_documents(ds["text"])


def load_eval_text(source: str) -> str:
    """The text of a perplexity test set: 'wikitext2', 'c4', a .txt file or a save_to_disk folder.

    Dataset documents are joined with "\\n\\n"; a folder's split is test, else validation, else
    train. Raises EvalDataError when the source is missing or empty.
    """
    if source in NAMED_SETS:
        text = _from_named(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise EvalDataError(
                f"perplexity source {source!r} is neither {' nor '.join(NAMED_SETS)} nor an existing file or folder"
            )
        text = _from_folder(path) if path.is_dir() else read_text_file(path, "perplexity source", EvalDataError)
    if not text.strip():
        raise EvalDataError(f"perplexity source {source!r} holds no text")
    return text
