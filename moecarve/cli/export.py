"""`moecarve export DIR --format qwen2_moe --out OUT`: a carved folder as a standard HF MoE model."""

from __future__ import annotations

from .common import add_command, add_output_args, bold, console

VLLM_HINT = "serve it with: vllm serve {out}"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(sub) -> None:
    p = add_command(
        sub, "export",
        help="write a carved model in a standard Hugging Face MoE architecture (loads without moecarve)",
        description="Convert a carved folder (moecarve carve --method cmoe --router linear) into a standard transformers "
        "MoE checkpoint that AutoModelForCausalLM.from_pretrained loads without trust_remote_code and vLLM "
        "serves. The conversion is exact; settings it cannot reproduce exactly are refused before any weight is read.",
    )  # fmt: skip
    p.add_argument("model", help="a carved model folder (written by moecarve carve)")
    p.add_argument("--format", dest="fmt", default="qwen2_moe", metavar="FORMAT", help="target architecture: qwen2_moe")
    add_output_args(p)
    p.add_argument("--dtype", default="auto", choices=DTYPES, metavar="DTYPE",
                   help="cast the weights: float32, bfloat16, float16 (default: auto = keep the folder's)")  # fmt: skip
    p.set_defaults(func=run)


def check_exportable(ref, fmt: str) -> None:
    """What the carved folder's config.json alone decides: a carved folder, a source family and
    settings the format can express, routers it can express (checked on the skeleton: no weights)."""
    import importlib
    from types import SimpleNamespace

    from ..export import FORMATS, ExportError
    from ..io.save import NotCarvedError, read_config

    if not ref.carved:
        raise NotCarvedError(f"{ref.name} holds no moecarve model (config.json has no 'moecarve' entry); carve it "
                             "first: moecarve carve MODEL --method cmoe --router linear --out DIR")  # fmt: skip
    # each format module checks its source on model.config alone: a namespace holding the config is enough
    importlib.import_module(FORMATS[fmt].__module__).check_source(SimpleNamespace(config=read_config(ref.path)))
    routers = {e.get("router") for e in ref.config["moecarve"].get("modules", {}).values() if e.get("type", "moe") == "moe"}
    if routers - {"linear"}:
        raise ExportError(f"{ref.name} uses the {', '.join(sorted(r for r in routers if r))} router, which {fmt} cannot "
                          "express; carve with --method cmoe --router linear")  # fmt: skip


def run(args) -> int:
    from ..export import check_format, export
    from ..io.atomic import check_output
    from ..io.loading import check_model

    check_format(args.fmt)
    ref = check_model(args.model, tokenizer=False)  # a folder saved without a tokenizer exports without one
    check_exportable(ref, args.fmt)
    check_output(args.out, args.overwrite, inputs=[ref.path])
    console.print(f"exporting {bold(args.model)} as {args.fmt}")
    out = export(args.model, args.fmt, args.out, overwrite=args.overwrite, dtype=args.dtype)
    console.print(f"exported to {bold(out)} ({args.fmt}); {VLLM_HINT.format(out=out)}")
    return 0
