"""The base class of every error moecarve raises on purpose (bad input, impossible config).

The CLI prints these as one clear line and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class MoecarveError(Exception):
    """A user-facing error: bad input, unsupported model, impossible configuration."""


class UsageError(MoecarveError, ValueError):
    """Options that cannot work together or a value out of range, found before any work starts."""
