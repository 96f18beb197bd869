"""Arguments and output shared by several subcommands: one spelling per concept.

| concept                          | flag                          | old spellings (hidden, one release) |
| output folder / replace it       | --out DIR, --overwrite        | compare --out was a file stem        |
| calibration or training text     | --calib SOURCE                | finetune --data                      |
| its windows                      | --samples N, --seqlen L       |                                      |
| perplexity text                  | --ppl SET                     | carve/finetune/condense --eval       |
| its characters / window length   | --ppl-chars N, --ppl-seqlen L | --eval-chars, --max-chars / --eval-seqlen, eval/compare --seqlen |
| where and how a model loads      | --device --dtype --device-map --revision --trust-remote-code | |

Nothing here imports torch or transformers: `moecarve --help` builds every parser.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..io.loading import DTYPE_CHOICES

# a pipe or a log file gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once, at the end of its help; not for flags, None, or help
    that already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def add_command(sub, name: str, help: str, description: str) -> Parser:
    """A subcommand parser with moecarve's help formatting."""
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def at_least(lo: int | float, kind: type = int):
    """An argparse type: a number of `kind` >= lo."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value

    return parse


def in_range(lo: float, hi: float, hi_open: bool = False):
    """An argparse type: a float in [lo, hi] ([lo, hi) with hi_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not (lo <= value < hi if hi_open else lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {text}")
        return value

    return parse


def positive(kind: type = float):
    """An argparse type: a number > 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def alias(p: argparse.ArgumentParser, *names: str, dest: str, **kw) -> None:
    """Old spellings of an option: still accepted, hidden from --help (kept for one release)."""
    p.add_argument(*names, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def add_output_args(p: argparse.ArgumentParser, what: str = "output folder (written atomically)") -> None:
    p.add_argument("--out", required=True, metavar="DIR", help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder moecarve wrote (or an empty one)")  # fmt: skip


def add_calib_args(p: argparse.ArgumentParser, samples: int, seqlen: int, what: str = "calibration",
                   required: bool = False) -> None:  # fmt: skip
    """--calib SOURCE --samples N --seqlen L: the text a command fits to, and its windows.

    required: checked by the command, not argparse, so that old spellings (finetune --data) count.
    """
    source = "required" if required else "default: the corpus shipped with moecarve"
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help=f"{what} text: a text file or a local datasets folder ({source})")  # fmt: skip
    p.add_argument("--samples", type=at_least(1), default=samples, help=f"{what} windows")
    p.add_argument("--seqlen", type=at_least(2), default=seqlen,
                   help=f"tokens per {what} window (clipped to the model's max positions)")  # fmt: skip


def add_ppl_args(p: argparse.ArgumentParser, chars: int | None, seqlen: int, what: str) -> None:
    """--ppl SET --ppl-chars N --ppl-seqlen L, with their old spellings as hidden aliases."""
    p.add_argument("--ppl", default=None, metavar="SET", help=what)
    p.add_argument("--ppl-chars", type=at_least(1), default=chars, metavar="N",
                   help="use only the first N characters of the perplexity text" + ("" if chars else " (default: all)"))  # fmt: skip
    p.add_argument("--ppl-seqlen", type=at_least(2), default=seqlen, metavar="L",
                   help="perplexity window length in tokens (clipped to the model's max positions)")  # fmt: skip
    alias(p, "--eval", dest="ppl")
    alias(p, "--eval-chars", "--max-chars", dest="ppl_chars", type=at_least(1))
    alias(p, "--eval-seqlen", dest="ppl_seqlen", type=at_least(2))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Where and how the model loads: every command that loads a model has these."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto = CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, metavar="DTYPE",
                   help="float32, bfloat16, float16 (default: auto = bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="an accelerate device map for loading, e.g. auto (spreads the model over GPUs and CPU); "
                   "replaces --device")  # fmt: skip
    p.add_argument("--revision", default=None, help="hub models: the branch, tag or commit to load")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="hub or local models with their own modeling code: allow running it")  # fmt: skip


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seeds window sampling and every random step")


def check_load_args(args, refs) -> None:
    """Refuse add_model_args' options that would be ignored: --revision when no model is a hub
    model, --device-map together with a --device; and what a GGUF file cannot do (check_gguf_args)."""
    from ..errors import UsageError

    if args.revision is not None and all(r.path is not None for r in refs):
        raise UsageError(f"--revision picks a version of a hub model; {refs[0].name!r} is a local folder (drop --revision)")
    if args.device_map is not None and args.device != "auto":
        raise UsageError("--device-map places the model itself; drop --device (or --device-map)")
    check_gguf_args(args, refs)


def check_gguf_args(args, refs) -> None:
    """Refuse, for a GGUF file, the options that read safetensors one layer at a time (a streamed
    carve, --layerwise) or place a model as it loads (--device-map): transformers dequantises a GGUF
    file whole, in memory."""
    from ..errors import UsageError
    from ..io.loading import gguf_refusal

    for ref in refs:
        if ref.gguf is None:
            continue
        if args.device_map is not None:
            raise UsageError(gguf_refusal(ref.name, "--device-map places a model as it loads", "use --device"))
        if hasattr(args, "offload") and (args.offload == "disk" or args.resume):
            raise UsageError(gguf_refusal(ref.name, "a streamed carve (--offload disk, --resume) reads safetensors one layer "
                                          "at a time", "drop --offload disk, or carve a folder saved from it"))  # fmt: skip
        if getattr(args, "layerwise", False):
            raise UsageError(gguf_refusal(ref.name, "--layerwise reads safetensors one layer at a time", "drop --layerwise"))


def load_kwargs(args) -> dict:
    """load_any's keyword arguments from add_model_args' options."""
    return {"revision": args.revision, "trust_remote_code": args.trust_remote_code, "device_map": args.device_map}


SHIPPED_CORPUS = "the corpus shipped with moecarve"


def card_info(args, calibration: bool = True, ppl_windows=None, ppl_before: float | None = None,
              ppl_after: float | None = None, notes: list[str] | None = None):  # fmt: skip
    """The model card's CardInfo (moecarve.io.card) from a command's options: the source model
    (MODEL, --revision), the --calib text (calibration=False where --calib is not what the output
    was calibrated on, as a fine-tune's training text), the perplexities and the --ppl windows
    [n, L] they were measured on. Texts are named by their file name."""
    from pathlib import Path

    from ..io.card import CardInfo

    calib = (Path(args.calib).name if args.calib else SHIPPED_CORPUS) if calibration else None
    return CardInfo(
        source=args.model, revision=args.revision, calibration=calib,
        eval_source=Path(args.ppl).name if args.ppl and ppl_windows is not None else None,
        eval_seqlen=int(ppl_windows.shape[1]) if ppl_windows is not None else None,
        ppl_before=ppl_before, ppl_after=ppl_after, notes=list(notes or []),
    )  # fmt: skip


def fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def routed(layer, value: str) -> str:
    """A routed-expert figure of a LayerReport for a table: "-" for a layer without routing (static pruning)."""
    return "-" if layer.router == "none" or not layer.load else value


def table(title: str, columns: list[str], rows: list[list], **kw) -> Table:
    t = Table(title=escape(title), **kw)
    for i, c in enumerate(columns):
        t.add_column(escape(c), justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[escape(str(v)) for v in r])
    return t


def bold(value) -> str:
    """A user-supplied value (a path, a model name) in bold, its brackets not read as rich markup."""
    return f"[bold]{escape(str(value))}[/]"
