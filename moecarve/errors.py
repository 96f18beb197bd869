"""The base class of every error moecarve raises on purpose (bad input, impossible config).

The CLI prints these as one clear line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class MoecarveError(Exception):
    """A user-facing error: bad input, unsupported model, impossible configuration."""
