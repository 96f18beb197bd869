"""`moecarve export DIR --format qwen2_moe --out OUT`: a carved folder as a standard HF MoE model."""

from __future__ import annotations

import argparse

from ..export import FORMATS, check_format, export
from ..io.atomic import check_output
from .common import console

VLLM_HINT = "serve it with: vllm serve {out}"


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a carved model in a standard Hugging Face MoE architecture (loads without moecarve)",
        description="Convert a carved folder (moecarve carve --method cmoe --router linear) into a standard transformers "
        "MoE checkpoint that AutoModelForCausalLM.from_pretrained loads without trust_remote_code and vLLM "
        "serves. The conversion is exact; settings it cannot reproduce exactly are refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a carved model folder (written by moecarve carve)")
    p.add_argument("--format", dest="fmt", default="qwen2_moe", choices=sorted(FORMATS), help="target architecture")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default="auto", help="cast the weights: float32, bfloat16, float16 (default: keep)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_format(args.fmt)
    check_output(args.out, args.overwrite)
    with console.status(f"exporting {args.model} as {args.fmt}"):
        out = export(args.model, args.fmt, args.out, overwrite=args.overwrite, dtype=args.dtype)
    console.print(f"exported to [bold]{out}[/] ({args.fmt}); {VLLM_HINT.format(out=out)}")
    return 0
