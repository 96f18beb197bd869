"""The decode runtime: dense and carved models run outside transformers, one native step per token.

    from moecarve.runtime import Runtime
    rt = Runtime(model, precision="bf16", threads=2, max_slots=8)
    logits = rt.prefill(prompt_ids)            # [vocab] of the last prompt token
    logits = rt.step([tok], [pos], [0], [0])   # one decode step of sequence 0

Layout (one idea per file): arch.py (a family's entry in moecarve.adapters, or a refusal), pack.py (weight layouts),
weights.py (a model -> the packed description), native.py (the C library and its ctypes
structures), step.py (Runtime: cache, threads, a step), sample.py, generate.py (token streams and
the batch scheduler), csrc/ (the C: thread pool, matrix products, attention, FFN, the step).
Nothing in carving/, modules/ or kernels/ imports this package.
"""

from .arch import UnsupportedModel
from .generate import Engine, Request, RequestError, TextStream, generate
from .load import Loaded, load_runtime
from .sample import Sampler, SamplingParams
from .step import Runtime, default_threads

__all__ = ["Engine", "Loaded", "Request", "RequestError", "Runtime", "Sampler", "SamplingParams", "TextStream",
           "UnsupportedModel", "default_threads", "generate", "load_runtime"]
