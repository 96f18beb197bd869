"""The decode runtime's view of a model's family: its `Decoder` entry in moecarve.adapters (the one
table of per-architecture knowledge), or a one-line refusal naming what the runtime lacks."""

from __future__ import annotations

from .. import adapters
from ..adapters import Decoder
from ..errors import MoecarveError


class UnsupportedModel(MoecarveError, ValueError):
    """A model the decode runtime cannot run (a family or a feature it does not implement)."""


def decoder_for(model_type: str, config) -> Decoder:
    """The family's decoder entry, or UnsupportedModel naming what is missing."""
    if model_type not in adapters.ADAPTERS:
        raise UnsupportedModel(f"the decode runtime cannot run model_type {model_type!r} (it runs "
                               f"{', '.join(adapters.supported())})")  # fmt: skip
    dec = adapters.ADAPTERS[model_type].decoder
    why = dec.check(config)
    if why:
        raise UnsupportedModel(f"the decode runtime cannot run {why}")
    return dec
