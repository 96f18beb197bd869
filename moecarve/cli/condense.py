"""`moecarve condense MODEL --layers L --experts R --out DIR [--finetune-steps N]`: condense MoE layers
(CD-MoE), optionally fine-tune the condensed layers, save, summarise."""

from __future__ import annotations

from .common import (
    add_calib_args, add_command, add_model_args, add_output_args, add_ppl_args, add_seed_arg, at_least, bold,
    card_info, check_load_args, console, fmt_params, load_kwargs, positive, table,
)  # fmt: skip


def register(sub) -> None:
    p = add_command(
        sub, "condense",
        help="shrink MoE layers into small dense layers (CD-MoE; optional fine-tune of those layers)",
        description="Condense L MoE layers of a model with shared experts (a moecarve carved model, Qwen2-MoE, "
        "DeepSeek-V2/V3; Mixtral, OLMoE, Qwen3-MoE with --experts >= 1) into dense layers: the shared experts "
        "plus R routed experts made always-on, the router removed. Experts and layers are chosen greedily by "
        "the Jensen-Shannon divergence of hidden states on calibration text. With --finetune-steps the condensed "
        "layers alone are then trained by next-token loss on --calib text (everything else stays frozen). The "
        "result saves in the source architecture where its config can hold the condensed layers as dense layers, "
        "else in moecarve's format.",
    )  # fmt: skip
    p.add_argument("model", help="a carved moecarve folder, a local MoE model folder or GGUF file, or a hub id")
    p.add_argument("--layers", type=at_least(1), required=True, help="L: MoE layers to condense")
    p.add_argument("--experts", type=at_least(0), default=0, help="R: routed experts kept always-on per condensed layer")
    p.add_argument("--beam", type=at_least(1), default=1, help="beam size of the greedy layer search")
    add_output_args(p)
    add_calib_args(p, samples=8, seqlen=512)
    p.add_argument("--max-tokens", type=at_least(1), default=None,
                   help="calibration tokens used by the per-layer expert search (default: all)")  # fmt: skip
    p.add_argument("--weighting", default="mean", choices=["mean", "expected"],
                   help="kept experts' weight: mean routing weight over the tokens that chose them (the paper), or over all tokens")  # fmt: skip
    add_seed_arg(p)
    p.add_argument("--finetune-steps", type=at_least(0), default=0, help="AdamW steps training only the condensed layers (0: training-free)")
    p.add_argument("--finetune-samples", type=at_least(1), default=64,
                   help="windows of --calib text (--seqlen tokens) to fine-tune on; the first --samples are the search's")  # fmt: skip
    p.add_argument("--finetune-lr", type=positive(), default=1e-4, help="learning rate of the condensed layers' fine-tune")
    p.add_argument("--finetune-batch-size", type=at_least(1), default=4, help="windows per fine-tuning step")
    p.add_argument("--finetune-lora-r", type=at_least(0), default=0, help="0: train the condensed layers fully; r: a rank-r LoRA on them")
    add_ppl_args(p, chars=200_000, seqlen=512, what="also report perplexity before and after on this text "
                 "(a .txt file, a save_to_disk folder, wikitext2 or c4)")  # fmt: skip
    add_model_args(p)
    p.set_defaults(func=run)


def check_condensable(ref, cfg, dtype) -> None:
    """The model's skeleton (meta device: no weights read) checked as condense checks the real model:
    MoE layers it knows, enough of them, R within each layer's routed experts."""
    import torch

    from ..condense.pipeline import validate
    from ..stream.skeleton import build_skeleton

    validate(build_skeleton(ref.config_dir, dtype), cfg, torch.zeros(1, 2, dtype=torch.long))


def run(args) -> int:
    import torch

    from ..adapters import clip_seqlen
    from ..calibration import read_text, tokenize_windows
    from ..condense import MOECARVE_SAVE_FORMAT, CondenseConfig, condense, save_condensed
    from ..eval.data import load_eval_text
    from ..eval.perplexity import eval_windows, perplexity
    from ..io.atomic import check_output
    from ..io.loading import check_model, load_any, resolve_device, resolve_dtype
    from ..io.save import load_report

    cfg = CondenseConfig(n_layers=args.layers, n_experts=args.experts, beam=args.beam, max_tokens=args.max_tokens,
                         weighting=args.weighting, seed=args.seed, finetune_steps=args.finetune_steps,
                         finetune_lr=args.finetune_lr, finetune_batch_size=args.finetune_batch_size,
                         finetune_lora_r=args.finetune_lora_r)  # fmt: skip
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    ref = check_model(args.model, args.revision)
    check_load_args(args, [ref])
    check_condensable(ref, cfg, dtype)
    check_output(args.out, args.overwrite, inputs=[ref.path, args.calib, args.ppl])
    calib_text = read_text(args.calib)  # a missing, empty or binary source fails before the model loads
    ppl_text = load_eval_text(args.ppl) if args.ppl else None
    torch.manual_seed(args.seed)
    model, tok = load_any(ref, args.dtype, args.device, **load_kwargs(args))
    # one seeded draw: its first --samples windows are exactly those a plain `--samples` run searches on
    n_windows = max(args.samples, args.finetune_samples if cfg.finetune_steps else 0)
    all_windows = tokenize_windows(tok, calib_text, n_windows, clip_seqlen(model.config, args.seqlen), args.seed)
    windows, tune_windows = all_windows[: args.samples], all_windows[: args.finetune_samples]
    ppl, ev = {}, None
    if ppl_text is not None:
        ev = eval_windows(tok, args.ppl, clip_seqlen(model.config, args.ppl_seqlen), args.ppl_chars, ppl_text)
        console.print("perplexity before condensing")
        ppl["before"] = perplexity(model, ev, batch_size=8, progress=True)
    console.print(f"condensing {bold(args.model)}: {cfg.n_layers} layers, R={cfg.n_experts}, beam {cfg.beam}, "
                  f"on {windows.shape[0]}x{windows.shape[1]} calibration tokens")  # fmt: skip
    report = condense(model, cfg, windows, finetune_windows=tune_windows)
    if ppl_text is not None:
        console.print("perplexity after condensing")
        ppl["after"] = perplexity(model, ev, batch_size=8, progress=True)
    carve_report = load_report(ref.path) if ref.carved else None
    card = card_info(args, ppl_windows=ev, ppl_before=ppl.get("before"), ppl_after=ppl.get("after"))
    save_condensed(model, args.out, report, tokenizer=tok, carve_report=carve_report, overwrite=args.overwrite, card=card)
    print_summary(report, ppl)
    native = report.format != MOECARVE_SAVE_FORMAT
    fmt = f"its own {report.format} format (plain transformers)" if native else "moecarve's format"
    console.print(f"saved to {bold(args.out)} in {fmt}: {report.format_reason}", soft_wrap=True, highlight=False)
    return 0


def print_summary(report, ppl: dict) -> None:
    rows = [
        [k + 1, s.layer, " ".join(map(str, s.experts)) or "-", " ".join(f"{w:.3f}" for w in s.expert_weights) or "-",
         " → ".join(f"{j:.4f}" for j in s.js_layer), f"{s.js_model:.4f}"]
        for k, s in enumerate(report.steps)
    ]  # fmt: skip
    console.print(table("condensed layers, in the order chosen", ["step", "layer", "experts kept", "weights", "layer JS", "model JS"], rows))
    summary = [
        ["parameters before / after", f"{fmt_params(report.params_before)} / {fmt_params(report.params_after)}"],
        ["memory before / after", f"{report.bytes_before / 2**20:.1f} MiB / {report.bytes_after / 2**20:.1f} MiB"],
        ["search time", f"{report.seconds:.1f} s"],
    ]
    if report.finetune is not None:
        ft = report.finetune
        kind = "full" if not ft.lora_r else f"LoRA r={ft.lora_r}"
        summary += [
            ["fine-tune", f"{ft.steps} steps ({kind}, {fmt_params(ft.trainable_params)} trainable) "
                          f"on {ft.train_windows} windows, {ft.seconds:.1f} s"],
            ["calibration loss before / after fine-tune", f"{ft.loss_before:.4f} / {ft.loss_after:.4f}"],
        ]  # fmt: skip
    if ppl:
        summary += [["perplexity before", f"{ppl['before']:.3f}"], ["perplexity after", f"{ppl['after']:.3f}"]]
    console.print(table("condense summary", ["", "value"], summary))
