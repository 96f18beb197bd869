"""`moecarve` command line: a thin shell over the public API.

Each subcommand lives in its own module with `register(subparsers)`; the module sets `func=run`
on its parser and imports torch, transformers and the library inside `run`, so that `--help`
stays fast. Every error a user can cause (a MoecarveError, an OSError, a damaged JSON or
safetensors file) prints as one line on stderr with exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys

from ..errors import MoecarveError
from .common import Parser
from .progress import log_lines

# subcommand modules, in the order `moecarve --help` lists them
COMMANDS = ["carve", "inspect", "eval", "compare", "frontier", "finetune", "condense", "export", "generate", "chat", "serve", "bench"]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moecarve")
    except PackageNotFoundError:  # a source checkout that was not pip-installed
        return "unknown (not installed)"


def build_parser() -> Parser:
    p = Parser(
        prog="moecarve",
        description="Carve dense causal LMs into Mixture-of-Experts models without training (CMoE), "
        "evaluate, fine-tune, condense and export them.",
    )
    p.add_argument("--version", action="version", version=f"moecarve {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return p


def is_user_error(e: BaseException) -> bool:
    """Errors that a bad input causes, not a bug: shown as one line, exit code 2."""
    if isinstance(e, (MoecarveError, OSError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    import pickle

    if isinstance(e, pickle.UnpicklingError):  # a pickle checkpoint the safe loader refused
        return True
    return type(e).__module__.startswith("safetensors") and type(e).__name__ == "SafetensorError"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """The message of `e` on one line, without terminal colour codes (transformers' and torch's
    messages span several lines and carry some)."""
    return " ".join(_ANSI.sub("", str(e)).split()) or type(e).__name__


class _WarningLines(logging.Handler):
    """moecarve's logger warnings as "warning: ..." lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {one_line(Exception(record.getMessage()))}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    logger = logging.getLogger("moecarve")
    handler = _WarningLines(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with log_lines():
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    sys.exit(main())
