"""`moecarve` command line: a thin shell over the public API.

Each subcommand lives in its own module with `register(subparsers)`; the module sets
`func=run` on its parser. Errors moecarve raises on purpose print as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console

from ..errors import MoecarveError

# subcommand modules, in the order `moecarve --help` lists them
COMMANDS = ["carve", "inspect", "eval", "compare", "finetune", "condense", "export"]

err = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecarve",
        description="Carve dense causal LMs into Mixture-of-Experts models without training (CMoE), "
        "evaluate, export and condense them.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except MoecarveError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
