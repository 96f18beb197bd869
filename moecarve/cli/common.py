"""Arguments and output shared by several subcommands."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

# a pipe or a log file gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto = CUDA when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: auto = bf16 on CUDA, fp32 on CPU)")


def fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def table(title: str, columns: list[str], rows: list[list], **kw) -> Table:
    t = Table(title=title, **kw)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
