"""The error every exporter raises for a model it cannot represent exactly."""

from ..errors import MoecarveError


class ExportError(MoecarveError, ValueError):
    """The carved model cannot be written in the requested format without changing what it computes."""
