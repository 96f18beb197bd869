"""Bad inputs over every subcommand: exit code 2, one line on stderr naming the problem, no
traceback, nothing written outside the intended output (the whole surrounding folder is hashed
before and after), all before any real work where the problem can be known before it.

The models are tiny random ones (two layers, hidden 64) with the reference tokenizer, built once
for the module; every case runs `moecarve.cli.main` in-process, inside that folder (so `--out .`
would destroy it), with the Hugging Face Hub forced offline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecarve
from moecarve.cli import main
from moecarve.io.atomic import MARKER, atomic_dir
from moecarve.stream.shards import TruncatedFile, write_shards

from tests.conftest import CALIB_TXT, ROOT, random_windows, tiny_model


def _truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _tiny_state(path: Path) -> None:
    save_file({"x": torch.zeros(1000)}, str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory, reference_tokenizer) -> Path:
    """One folder holding every input the cases need (paths in the cases are relative to it)."""
    root = tmp_path_factory.mktemp("world")
    tok, vocab = reference_tokenizer, len(reference_tokenizer)

    def save_model(name: str, model) -> Path:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    dense = save_model("dense", tiny_model("llama", vocab_size=vocab))
    nan = tiny_model("llama", vocab_size=vocab)
    with torch.no_grad():
        nan.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))
    save_model("nan", nan)
    carved = tiny_model("llama", vocab_size=vocab)
    report = moecarve.carve(carved, moecarve.CarveConfig.from_string("S1A1E4", method="cmoe"), random_windows(2, 32, vocab=vocab),
                            progress=False)  # fmt: skip
    moecarve.save(carved, root / "carved", tokenizer=tok, report=report)
    linear = tiny_model("llama", vocab_size=vocab)  # exportable: the --out cases of export get past its checks
    moecarve.carve(linear, moecarve.CarveConfig.from_string("S1A1E4", method="cmoe", router="linear"),
                   random_windows(2, 32, vocab=vocab), progress=False)  # fmt: skip
    moecarve.save(linear, root / "linear", tokenizer=tok)

    for src, name in [(dense, "dense_trunc"), (root / "carved", "carved_trunc")]:
        shutil.copytree(src, root / name)
        _truncate(root / name / "model.safetensors")
    shutil.copytree(dense, root / "notok")
    for f in (root / "notok").iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    shutil.copytree(dense, root / "missing_shard")
    (root / "missing_shard" / "model.safetensors").rename(root / "missing_shard" / "model-00001-of-00002.safetensors")
    (root / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    shutil.copytree(root / "carved", root / "carved_badreport")
    _truncate(root / "carved_badreport" / "carve_report.json")
    shutil.copytree(root / "carved", root / "carved_badconfig")
    _truncate(root / "carved_badconfig" / "config.json")

    config = json.loads((dense / "config.json").read_text())
    for name, body in [("bare", config), ("bert", {"model_type": "bert", "vocab_size": 100, "hidden_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}),
                       ("gpt2", {"model_type": "gpt2", "vocab_size": vocab, "n_positions": 128, "n_embd": 64, "n_layer": 2,
                       "n_head": 4, "n_inner": 128}), ("notype", {"hidden_size": 64})]:  # fmt: skip
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(body))
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text('{"model_type": "llama", ')
    shutil.copytree(dense, root / "pickled")  # pickle weights holding an object torch's safe loader refuses
    state = load_file(str(root / "pickled" / "model.safetensors"))
    (root / "pickled" / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse.Namespace(a=1)}, root / "pickled" / "pytorch_model.bin")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes, not moecarve's")
    (root / "models").mkdir()  # `models/bsae` is a typo under it, not a hub id
    (root / "afile").write_text("a plain file")

    (root / "text.txt").write_text(CALIB_TXT.read_text()[:20_000])
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "control.txt").write_bytes(bytes(b % 31 + 1 for b in range(8000)))  # no NUL, mostly control characters
    (root / "old.json").write_text('{"not": "an eval result"}')
    for name, body in [("fr_badjson", "{"), ("fr_other", '{"points": 1}')]:  # earlier frontier sweeps, damaged
        (root / name).mkdir()
        (root / name / MARKER).write_text("")
        (root / name / "frontier.json").write_text(body)

    # an unfinished streamed carve of stream_out, a damaged one, one whose layer file is gone
    for name, state in [("stream_out", {"done": 0, "fingerprint": {}}), ("badstate", None), ("gone", {"done": 1, "fingerprint": {}})]:
        part = root / f"{name}.partial"
        part.mkdir()
        (part / "state.json").write_text("{" if state is None else json.dumps(state))
    # fine-tune checkpoints: a complete one, one with cut-off tensors, one with a damaged state
    for name in ("ft_plain", "ft_trunc", "ft_badjson"):
        step = root / f"{name}.ckpt" / "step-000001"
        step.mkdir(parents=True)
        (step / "state.json").write_text("{" if name == "ft_badjson" else json.dumps({"step": 1}))
        _tiny_state(step / "state.safetensors")
    _truncate(root / "ft_trunc.ckpt" / "step-000001" / "state.safetensors")
    return root


def problem_lines(err: str) -> list[str]:
    """stderr without progress bars (a run that fails inside the work shows its progress first)."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and folder under root, hidden ones included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


CARVE = ["carve", "dense", "--out", "out", "--calib", "text.txt", "--samples", "2", "--seqlen", "32", "--config", "S1A1E4"]
FT = ["finetune", "carved", "--calib", "text.txt", "--samples", "2", "--seqlen", "32", "--heldout", "0"]
CONDENSE = ["condense", "carved", "--layers", "1", "--experts", "1", "--out", "out", "--calib", "text.txt", "--samples", "2", "--seqlen", "32"]
EXPORT = ["export", "carved", "--out", "out"]
FRONTIER = ["frontier", "dense", "--configs", "S1A1E4", "--ppl", "text.txt", "--ppl-seqlen", "64", "--calib", "text.txt",
            "--samples", "2", "--seqlen", "32", "--out", "out"]  # fmt: skip
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def carve(*extra, model="dense"):
    return [CARVE[0], model, *CARVE[2:], *extra]


def granular(*extra):
    """carve with --expert-size instead of --config."""
    return [*CARVE[:-2], "--expert-size", *extra]


def frontier(*extra, model="dense"):
    return [FRONTIER[0], model, *FRONTIER[2:], *extra]


CASES = [
    # the output folder: never the current folder, its parents, /, an input, someone else's files
    ("carve --out .", carve("--out", ".", "--overwrite"), "it is the current folder"),
    ("carve --out ..", carve("--out", "..", "--overwrite"), "a parent of the current folder"),
    ("carve --out /", carve("--out", "/", "--overwrite"), "it is /"),
    ("carve --out input", carve("--out", "dense", "--overwrite"), "is (or holds) the input"),
    ("carve --out calib", carve("--out", "text.txt", "--overwrite"), "is (or holds) the input"),
    ("carve --out notes", carve("--out", "notes", "--overwrite"), "moecarve did not write it"),
    ("carve --out file", carve("--out", "afile", "--overwrite"), "exists and is not a folder"),
    ("carve --out exists", carve("--out", "carved"), "already exists; pass --overwrite"),
    ("carve --out under a file", carve("--out", "afile/sub"), "cannot write afile/sub: "),
    ("carve --export-out notes", carve("--method", "cmoe", "--router", "linear", "--export", "qwen2_moe", "--export-out", "notes",
                                       "--overwrite"), "moecarve did not write it"),  # fmt: skip
    # the model
    ("carve missing model", carve(model="no-such-model"), "model folder 'no-such-model' does not exist"),
    ("carve one-slash typo", carve(model="models/bsae"), "model folder 'models/bsae' does not exist"),
    ("carve hub id offline", carve(model="nobody-xyz/no-model"), "cannot be reached"),
    ("carve empty folder", carve(model="empty"), "is an empty folder (no config.json)"),
    ("carve no config", carve(model="notes"), "is not a model folder (no config.json)"),
    ("carve model is a file", carve(model="afile"), "is a file, not a model folder"),
    ("carve damaged config.json", carve(model="badjson"), "config.json is not valid JSON"),
    ("carve config without model_type", carve(model="notype"), "has no model_type"),
    ("carve bare config, unsupported", carve(model="bert"), "cannot carve model_type 'bert'"),
    ("carve bare config, supported", carve(model="bare"), "holds no model weights"),
    ("carve truncated weights", carve(model="dense_trunc"), "model.safetensors is truncated"),
    ("carve truncated weights streamed", carve("--offload", "disk", model="dense_trunc"), "model.safetensors is truncated"),
    ("carve missing shard", carve(model="missing_shard"), "names shard(s) missing"),
    ("carve no tokenizer", carve(model="notok"), "has no tokenizer files"),
    ("carve carved folder", carve(model="carved"), "is already carved"),
    ("carve NaN weights", carve(model="nan"), "NaN"),
    # the configuration and the numbers
    ("carve N does not divide", carve("--config", "S2A2E7"), "do not divide the intermediate size 128"),
    ("carve bad config string", carve("--config", "2-2-8"), "cannot parse carving config"),
    ("carve k_act too large", carve("--k-act", "1000"), "k_act=1000 exceeds"),
    ("carve --k-act 0", carve("--k-act", "0"), "argument --k-act: must be >= 1"),
    ("carve --samples 0", carve("--samples", "0"), "argument --samples: must be >= 1"),
    ("carve --seqlen 1", carve("--seqlen", "1"), "argument --seqlen: must be >= 2"),
    ("carve --seqlen x", carve("--seqlen", "x"), "expected an integer, got 'x'"),
    ("carve --shadow-bits 9", carve("--shadow-bits", "9"), "shadow_bits must be 0"),
    ("carve --router linear fitted", carve("--router", "linear"), "is a choice of method 'cmoe'"),
    ("carve --selection threshold cmoe", carve("--selection", "threshold", "--method", "cmoe"), "calibrated on the shadow router"),
    ("carve --selection x", carve("--selection", "all"), "argument --selection: invalid choice: 'all'"),
    ("carve --config and --expert-size", carve("--expert-size", "32", "--active", "0.5"), "pass either --config or --expert-size"),
    ("carve --expert-size alone", granular("32"), "--expert-size needs --active F"),
    ("carve --config and --active", carve("--active", "0.5"), "pass either --config or --active"),
    ("carve --expert-size not dividing", granular("48", "--active", "0.5"), "expert size 48 does not divide the intermediate size 128"),
    ("carve --active 0", granular("32", "--active", "0"), "need 0 < active <= 1"),
    ("carve --shared above --active", granular("32", "--active", "0.25", "--shared", "0.5"), "0 <= shared <= active"),
    ("carve --active 2", granular("32", "--active", "2"), "argument --active: must be in [0.0, 1.0]"),
    ("carve --method x", carve("--method", "x"), "argument --method: invalid choice"),
    ("carve --dtype int8", carve("--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
    ("carve --device banana", carve("--device", "banana"), "unknown device 'banana'"),
    ("carve --device cuda", carve("--device", "cuda"), "CUDA is not available", NO_CUDA),
    ("carve --revision of a folder", carve("--revision", "v2"), "--revision picks a version of a hub model"),
    ("carve --device-map and --device", carve("--device-map", "auto", "--device", "cpu"), "drop --device (or --device-map)"),
    ("carve --device-map streamed", carve("--device-map", "auto", "--offload", "disk"), "--device-map applies to in-memory"),
    ("carve --max-shard-size x", carve("--max-shard-size", "lots"), "cannot parse shard size"),
    ("carve --ppl-seqlen 1", carve("--ppl-seqlen", "1"), "argument --ppl-seqlen: must be >= 2"),
    ("carve --eval-chars 0 (old spelling)", carve("--eval-chars", "0"), "argument --eval-chars/--max-chars: must be >= 1"),
    ("carve no --out", CARVE[:2], "the following arguments are required: --out"),
    ("carve unknown option", carve("--fast"), "unrecognized arguments: --fast"),
    # texts
    ("carve missing calib", carve("--calib", "no-such.txt"), "calibration source 'no-such.txt' does not exist"),
    ("carve empty calib", carve("--calib", "empty.txt"), "the calibration text is empty"),
    ("carve binary calib", carve("--calib", "binary.bin"), "is not a text file (it contains NUL bytes)"),
    ("carve control-character calib", carve("--calib", "control.txt"), "does not look like text"),
    ("carve missing --ppl", carve("--ppl", "no-such.txt"), "is neither wikitext2 nor c4 nor an existing file"),
    ("carve binary --ppl", carve("--ppl", "binary.bin"), "is not a text file"),
    # export, streaming and resume options, checked before the carve
    ("carve --export with fitted", carve("--export", "qwen2_moe"), "needs --method cmoe --router linear"),
    ("carve --export unknown", carve("--method", "cmoe", "--router", "linear", "--export", "onnx"), "unknown export format 'onnx'"),
    ("carve --export gpt2", carve("--config", "S1A1E4", "--method", "cmoe", "--router", "linear", "--export", "qwen2_moe",
                                  model="gpt2"), "cannot export model_type 'gpt2' to qwen2_moe"),  # fmt: skip
    ("carve --export-out alone", carve("--export-out", "x"), "pass --export too"),
    ("carve --resume in memory", carve("--offload", "none", "--resume"), "--resume applies to streamed carves only"),
    ("carve unfinished partial", carve("--offload", "disk", "--out", "stream_out"), "holds an unfinished carve: pass --resume"),
    ("carve --resume damaged state", carve("--resume", "--out", "badstate"), "state.json is not valid JSON"),
    ("carve --resume layer file gone", carve("--resume", "--out", "gone"), "outside.safetensors is missing"),
    # inspect
    ("inspect dense", ["inspect", "dense"], "holds no moecarve model"),
    ("inspect missing", ["inspect", "no-such-dir"], "is not a model folder (no config.json)"),
    ("inspect damaged config", ["inspect", "carved_badconfig"], "config.json is not valid JSON"),
    ("inspect cut-off report", ["inspect", "carved_badreport"], "carve_report.json is not valid JSON"),
    ("inspect --plot-dir file", ["inspect", "carved", "--plot", "--plot-dir", "afile"], "cannot write afile: afile is a file, not a folder"),
    # eval
    ("eval nothing", ["eval", "dense"], "nothing to evaluate"),
    ("eval --seqlen 1 (old spelling)", ["eval", "dense", "--ppl", "text.txt", "--seqlen", "1"], "argument --seqlen: must be >= 2"),
    ("eval --batch-size 0", ["eval", "dense", "--ppl", "text.txt", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    ("eval --fewshot -1", ["eval", "dense", "--tasks", "piqa", "--fewshot", "-1"], "argument --fewshot: must be >= 0"),
    ("eval --dtype int8", ["eval", "dense", "--ppl", "text.txt", "--dtype", "int8"], "invalid choice: 'int8'"),
    ("eval --kernels triton", ["eval", "carved", "--ppl", "text.txt", "--kernels", "triton"], "runs on CUDA only", NO_CUDA),
    ("eval --kernels x", ["eval", "carved", "--ppl", "text.txt", "--kernels", "fastest"], "unknown kernels 'fastest'"),
    ("eval --kernels on a dense model", ["eval", "dense", "--ppl", "text.txt", "--kernels", "auto"], "is a dense model (drop --kernels)"),
    ("eval truncated weights", ["eval", "dense_trunc", "--ppl", "text.txt"], "model.safetensors is truncated"),
    ("eval pickle refused", ["eval", "pickled", "--ppl", "text.txt"], "which torch's safe loader refuses"),
    ("eval missing --ppl", ["eval", "dense", "--ppl", "no-such.txt"], "nor an existing file or folder"),
    ("eval binary --ppl", ["eval", "dense", "--ppl", "binary.bin"], "is not a text file"),
    ("eval --layerwise alone", ["eval", "dense", "--tasks", "piqa", "--layerwise"], "pass --ppl too"),
    ("eval --json folder", ["eval", "dense", "--ppl", "text.txt", "--json", "notes"], "is a folder; name a file"),
    ("eval --json other file", ["eval", "dense", "--ppl", "text.txt", "--json", "old.json"], "not an earlier result of moecarve eval"),
    ("eval --json under a file", ["eval", "dense", "--ppl", "text.txt", "--json", "afile/r.json"], "cannot write afile/r.json: "),
    # compare: every model before the first is measured
    ("compare one model", ["compare", "dense", "--ppl", "text.txt"], "needs a dense model and at least one carved model"),
    ("compare second missing", ["compare", "dense", "no-such-model", "--ppl", "text.txt"], "'no-such-model' does not exist"),
    ("compare second truncated", ["compare", "dense", "carved_trunc", "--ppl", "text.txt"], "model.safetensors is truncated"),
    ("compare --out .", ["compare", "dense", "carved", "--out", ".", "--overwrite"], "it is the current folder"),
    ("compare --out notes", ["compare", "dense", "carved", "--out", "notes", "--overwrite"], "moecarve did not write it"),
    ("compare --gen-tokens -1", ["compare", "dense", "carved", "--gen-tokens", "-1"], "argument --gen-tokens: must be >= 0"),
    # frontier: every candidate, the texts and the output folder before the model loads
    ("frontier no --configs", ["frontier", "dense", "--ppl", "text.txt", "--out", "out"], "required: --configs"),
    ("frontier no --ppl", [*FRONTIER[:4], *FRONTIER[6:]], "frontier measures perplexity: pass --ppl TEXT"),
    ("frontier unknown method", frontier("--methods", "default,fast"), "unknown method 'fast'"),
    ("frontier bad config string", frontier("--configs", "S1A1E4,2-2-8"), "cannot parse carving config '2-2-8'"),
    ("frontier empty list item", frontier("--configs", "S1A1E4,"), "has an empty item"),
    ("frontier N does not divide", frontier("--configs", "S1A1E4,S2A2E7"), "do not divide the intermediate size 128"),
    ("frontier probe in one-neuron experts", frontier("--configs", "S0A64E128", "--methods", "probe"),
     "cannot hold the probe router's 2 probes"),  # fmt: skip
    ("frontier carved model", frontier(model="carved"), "is already carved"),
    ("frontier truncated weights", frontier(model="dense_trunc"), "model.safetensors is truncated"),
    ("frontier missing --ppl", frontier("--ppl", "no-such.txt"), "is neither wikitext2 nor c4"),
    ("frontier binary --ppl", frontier("--ppl", "binary.bin"), "is not a text file"),
    ("frontier empty calib", frontier("--calib", "empty.txt"), "the calibration text is empty"),
    ("frontier --ppl-seqlen 32", frontier("--ppl-seqlen", "32"), "too short to time decoding"),
    ("frontier --speed-rounds 2", frontier("--speed-rounds", "2"), "argument --speed-rounds: must be >= 3"),
    ("frontier --threads 0", frontier("--threads", "0"), "argument --threads: must be >= 1"),
    ("frontier --kernels none", frontier("--kernels", "none"), "use --kernels torch"),
    ("frontier --kernels triton", frontier("--kernels", "triton"), "runs on CUDA only", NO_CUDA),
    ("frontier --device-map", frontier("--device-map", "auto"), "drop --device-map"),
    ("frontier --out exists", frontier("--out", "carved"), "already exists; pass --resume to continue its sweep"),
    ("frontier --out .", frontier("--out", ".", "--overwrite"), "it is the current folder"),
    ("frontier --out input", frontier("--out", "text.txt", "--overwrite"), "is (or holds) the input"),
    ("frontier --overwrite notes", frontier("--out", "notes", "--overwrite"), "moecarve did not write it"),
    ("frontier --resume and --overwrite", frontier("--resume", "--overwrite"), "pass one of them"),
    ("frontier --resume someone's folder", frontier("--out", "notes", "--resume"), "was not written by moecarve"),
    ("frontier --resume damaged json", frontier("--out", "fr_badjson", "--resume"), "frontier.json is not valid JSON"),
    ("frontier --resume other json", frontier("--out", "fr_other", "--resume"), "is not the result of moecarve frontier"),
    # finetune
    ("finetune --samples 0", [*FT, "--out", "out", "--samples", "0"], "argument --samples: must be >= 1"),
    ("finetune --seqlen 0", [*FT, "--out", "out", "--seqlen", "0"], "argument --seqlen: must be >= 2"),
    ("finetune --lr 0", [*FT, "--out", "out", "--lr", "0"], "argument --lr: must be > 0"),
    ("finetune --lora-dropout 1", [*FT, "--out", "out", "--lora-dropout", "1"], "must be in [0.0, 1.0)"),
    ("finetune no --calib", ["finetune", "carved", "--out", "out"], "finetune needs --calib"),
    ("finetune --out input", [*FT, "--out", "carved", "--overwrite"], "is (or holds) the input"),
    ("finetune --out .", [*FT, "--out", ".", "--overwrite"], "it is the current folder"),
    ("finetune truncated weights", ["finetune", "carved_trunc", *FT[2:], "--out", "out"], "model.safetensors is truncated"),
    ("finetune binary data (old --data)", ["finetune", "carved", "--data", "binary.bin", "--out", "out"], "is not a text file"),
    ("finetune --resume, no checkpoint", [*FT, "--out", "out", "--resume"], "holds no checkpoint to continue from"),
    ("finetune onto a checkpoint", [*FT, "--out", "ft_plain"], "holds a checkpoint of an earlier fine-tune"),
    ("finetune --resume truncated", [*FT, "--out", "ft_trunc", "--resume"], "state.safetensors is truncated"),
    ("finetune --resume damaged state", [*FT, "--out", "ft_badjson", "--resume"], "state.json is not valid JSON"),
    # condense
    ("condense --finetune-samples 0", [*CONDENSE, "--finetune-samples", "0"], "argument --finetune-samples: must be >= 1"),
    ("condense --layers 0", [*CONDENSE[:3], "0", *CONDENSE[4:]], "argument --layers: must be >= 1"),
    ("condense dense model", ["condense", "dense", *CONDENSE[2:]], "has no MoE layer moecarve can condense"),
    ("condense too many layers", [*CONDENSE[:3], "9", *CONDENSE[4:]], "cannot condense 9 layers"),
    ("condense R too large", [*CONDENSE[:5], "9", *CONDENSE[6:]], "cannot keep R=9"),
    ("condense truncated weights", ["condense", "carved_trunc", *CONDENSE[2:]], "model.safetensors is truncated"),
    ("condense --out .", [*CONDENSE, "--out", ".", "--overwrite"], "it is the current folder"),
    ("condense empty calib", [*CONDENSE, "--calib", "empty.txt"], "the calibration text is empty"),
    # export
    ("export dense", ["export", "dense", "--out", "out"], "holds no moecarve model"),
    ("export analytic router", EXPORT, "uses the analytic router, which qwen2_moe cannot express"),
    ("export unknown format", [*EXPORT, "--format", "onnx"], "unknown export format 'onnx'"),
    ("export --dtype int4", [*EXPORT, "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    ("export --out .", ["export", "linear", "--out", ".", "--overwrite"], "it is the current folder"),
    ("export --out input", ["export", "linear", "--out", "linear", "--overwrite"], "is (or holds) the input"),
    ("export --out notes", ["export", "linear", "--out", "notes", "--overwrite"], "moecarve did not write it"),
    ("export --out exists", ["export", "linear", "--out", "carved"], "already exists; pass --overwrite"),
    ("export truncated weights", ["export", "carved_trunc", "--out", "out"], "model.safetensors is truncated"),
    ("export missing", ["export", "no-such-dir", "--out", "out"], "does not exist"),
    # generate / chat / serve / bench: the decode runtime's front ends
    ("generate missing", ["generate", "no-such-dir", "--prompt", "x"], "does not exist"),
    ("generate empty prompt", ["generate", "dense", "--prompt", ""], "the prompt is empty"),
    ("generate --top-p 0", ["generate", "dense", "--prompt", "x", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    ("generate prompt past --max-ctx", ["generate", "dense", "--prompt", "word " * 40, "--max-ctx", "16", "--threads", "1"],
     "the context holds 16"),
    ("chat truncated weights", ["chat", "dense_trunc"], "is truncated"),
    ("chat --threads 0", ["chat", "dense", "--threads", "0"], "--threads: must be >= 1"),
    ("serve missing", ["serve", "no-such-dir"], "does not exist"),
    ("serve --port 0", ["serve", "dense", "--port", "0"], "--port: must be in 1..65535"),
    ("bench missing", ["bench", "no-such-dir"], "does not exist"),
    ("bench unknown precision", ["bench", "dense", "--precision", "fp8"], "unknown precision 'fp8'"),
    ("bench --threads 0", ["bench", "dense", "--threads", "0"], "expected integers >= 1"),
    ("bench --carve of a dense folder", ["bench", "dense", "--carve", "dense"], "not a carved folder"),
    ("bench --gguf without --llama-bench", ["bench", "dense", "--gguf", "x.gguf"], "--llama-bench and --gguf go together"),
    ("bench --llama-bench missing", ["bench", "dense", "--llama-bench", "nope", "--gguf", "x.gguf"], "no such file"),
    # the command itself
    ("no command", [], "the following arguments are required: COMMAND"),
    ("unknown command", ["shrink", "dense"], "invalid choice: 'shrink'"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never reach the network: hub ids resolve from the local cache or fail at once."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_the_table_covers_every_command():
    from moecarve.cli import COMMANDS

    argvs = [c[1] for c in CASES]
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {a[0] for a in argvs if a} >= set(COMMANDS)


@pytest.mark.parametrize("argv,message", [pytest.param(argv, msg, id=name, marks=marks) for name, argv, msg, *marks in CASES])
def test_bad_input_fails_with_one_line_and_writes_nothing(argv, message, world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    before = snapshot(world)
    code = main(argv)
    err = capsys.readouterr().err
    lines = problem_lines(err)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert snapshot(world) == before


def test_stopped_streamed_carve_then_truncated_resume(world, tmp_path, reference_tokenizer, capsys):
    """A streamed carve that stops after layer 0 says that --resume continues it. Then the issue's
    hang: that layer's file cut short and `--resume` in a real process: exit 2 and "is truncated"
    within the timeout, not a spin, and nothing changed."""
    model = tiny_model("llama", vocab_size=len(reference_tokenizer))
    with torch.no_grad():  # layer 1 poisoned: the carve stops there, after layer 0 is on disk
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "m")
    reference_tokenizer.save_pretrained(tmp_path / "m")
    argv = ["carve", str(tmp_path / "m"), "--out", str(tmp_path / "st"), "--offload", "disk", "--calib", str(world / "text.txt"),
            "--samples", "2", "--seqlen", "32", "--config", "S1A1E4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(problem_lines(err)) == 1, err
    assert "NaN" in err and "keeps 1 finished layer(s): rerun the same command with --resume" in err
    layer0 = tmp_path / "st.partial" / "layer-00000.safetensors"
    _truncate(layer0, 0.3)
    before = snapshot(tmp_path)
    run = subprocess.run([sys.executable, "-m", "moecarve", *argv, "--resume"], capture_output=True, text=True, timeout=240,
                         cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(problem_lines(run.stderr)) == 1, run.stderr
    assert "layer-00000.safetensors is truncated" in run.stderr and "--overwrite" in run.stderr
    assert snapshot(tmp_path) == before


def test_write_shards_stops_on_a_file_that_shrank(tmp_path):
    """The copy loop itself: a source cut short after its header was read raises, never spins."""
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4096)}, str(src))
    from moecarve.stream.shards import read_header

    entries = read_header(src)
    _truncate(src, 0.5)
    from moecarve.stream import shards

    with pytest.raises(TruncatedFile, match="is truncated"):
        shards._write_one(tmp_path / "out.safetensors", entries)
    with pytest.raises(TruncatedFile, match="is truncated"):
        write_shards([src], tmp_path)


def test_overwrite_replaces_only_what_moecarve_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir("out") as tmp:
        (tmp / "a.txt").write_text("first")
    assert (tmp_path / "out" / MARKER).is_file()
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    with atomic_dir("out", overwrite=True) as tmp:  # ours: replaced
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "b.txt"]
    (tmp_path / "empty").mkdir()
    with atomic_dir("empty", overwrite=True) as tmp:  # empty: replaced
        (tmp / "c.txt").write_text("third")
    assert (tmp_path / "empty" / "c.txt").exists()


def test_stale_temporary_folders_of_the_same_output_are_removed(tmp_path):
    stale = [tmp_path / ".out.tmp-abcd1234", tmp_path / ".out.old-zz_z9999"]
    keep = [tmp_path / ".other.tmp-abcd1234", tmp_path / ".out.tmp-notours!", tmp_path / "notes"]
    for p in stale + keep:
        p.mkdir()
        (p / "f").write_text("x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("y")
    assert not any(p.exists() for p in stale)
    assert all((p / "f").exists() for p in keep)


def test_non_utf8_text_is_read_with_one_warning(world, tmp_path, monkeypatch, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème brûlée, naïve façade. ".encode("latin-1") * 50)
    from moecarve.calibration import read_text

    assert "caf\ufffd" in read_text(str(latin))
    # the CLI shows it as one warning line; the run then stops at the next problem (a missing --ppl)
    monkeypatch.chdir(world)
    assert main(carve("--calib", str(latin), "--ppl", "no-such.txt")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: ") and "is not valid UTF-8" in lines[0]
    assert lines[1].startswith("error: ")
