"""Streaming: carve and evaluate models larger than memory, one decoder layer at a time."""

from .carve import ResumeError, carve_streamed, partial_dir
from .checkpoint import Checkpoint, CheckpointError, would_not_fit
from .skeleton import InMemoryLayers, StreamedModel

__all__ = ["Checkpoint", "CheckpointError", "InMemoryLayers", "ResumeError", "StreamedModel", "carve_streamed", "partial_dir", "would_not_fit"]
