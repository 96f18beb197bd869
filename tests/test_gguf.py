"""GGUF files as input (issue 27): a `.gguf` path loads to exactly the model it holds, with its
tokenizer and chat template; `moecarve carve model.gguf` writes the same folder as a carve of a folder
holding the same weights; bad and unsupported files fail with one line (exit 2) before anything is
written. The files are tiny ones written here with the gguf package's GGUFWriter, laid out as
llama.cpp's converter lays out a LLaMA model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM

import moecarve
from moecarve.cli import main
from moecarve.errors import MoecarveError
from moecarve.io.gguf import GGUFError, UnsupportedGGUF, check_gguf
from moecarve.io.loading import check_model, load_any
from moecarve.io.save import ModelNotFound

from .conftest import CALIB_TXT, random_windows, tiny_model

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
TOKENS = sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]  # byte-level BPE


def interleave_rotary_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows [n_heads * head_dim, d] in llama.cpp's order: transformers rotates the two halves of
    each head, llama.cpp adjacent pairs, so its converter interleaves the halves (and transformers'
    GGUF loader undoes it)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, arch: str = "llama", qtype: GGMLQuantizationType | None = None, tokenizer: bool = True,
               skip: str | None = None, f64: str | None = None) -> Path:  # fmt: skip
    """`model` (a tiny LLaMA) as a GGUF file: 2-D weights in `qtype` (default float32), the
    byte-level tokenizer and a chat template; `skip` leaves a tensor out, `f64` stores one as float64."""
    c = model.config
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    for add, value in [(w.add_block_count, c.num_hidden_layers), (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_rope_freq_base, c.rope_parameters["rope_theta"]),
                       (w.add_vocab_size, c.vocab_size), (w.add_rope_dimension_count, c.hidden_size // c.num_attention_heads)]:  # fmt: skip
        add(value)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_merges(MERGES)
        w.add_token_types([1] * (len(TOKENS) - 1) + [3])  # the last one is a control token
        w.add_bos_token_id(len(TOKENS) - 1)
        w.add_eos_token_id(len(TOKENS) - 1)
        w.add_chat_template(CHAT_TEMPLATE)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if gguf_name == skip:
            continue
        a = t.float().numpy()
        if ".q_proj." in name or ".k_proj." in name:
            a = interleave_rotary_halves(a, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        if gguf_name == f64:
            w.add_tensor(gguf_name, a.astype(np.float64))
        elif qtype is not None and a.ndim == 2:
            w.add_tensor(gguf_name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """tiny.gguf (float32), tiny-q8.gguf (Q8_0) and hf/ (the same weights and tokenizer as a folder),
    damaged and unsupported files, and a calibration text."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama", vocab_size=len(TOKENS))
    write_gguf(model, root / "tiny.gguf")
    write_gguf(model, root / "tiny-q8.gguf", qtype=GGMLQuantizationType.Q8_0)
    model.save_pretrained(root / "hf")
    _, tok = load_any(root / "tiny.gguf")
    tok.save_pretrained(root / "hf")
    data = (root / "tiny.gguf").read_bytes()
    (root / "magic.gguf").write_bytes(b"GGML" + data[4:])
    (root / "cut.gguf").write_bytes(data[: len(data) * 6 // 10])
    first = GGUFReader(root / "tiny.gguf").tensors[0].field  # its parts: name length, name, n_dims, dims, type, offset
    at = first.offset + sum(int(p.nbytes) for p in first.parts[:4])
    (root / "badtype.gguf").write_bytes(data[:at] + np.uint32(99).tobytes() + data[at + 4 :])
    write_gguf(model, root / "f64.gguf", f64="blk.0.ffn_up.weight")
    write_gguf(model, root / "rwkv.gguf", arch="rwkv7")
    write_gguf(model, root / "bloom.gguf", arch="bloom")
    write_gguf(model, root / "notok.gguf", tokenizer=False)
    write_gguf(model, root / "incomplete.gguf", skip="blk.1.ffn_down.weight")
    (root / "calib.txt").write_text(CALIB_TXT.read_text()[:20_000])
    return root


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits


def test_gguf_loads_exactly_with_tokenizer_and_chat_template(world, tmp_path):
    ref = check_model(world / "tiny.gguf")
    assert ref.gguf is not None and ref.gguf.architecture == "llama" and ref.gguf.tensor_types == {"F32": 21}
    assert (ref.config["model_type"], ref.config["hidden_size"], ref.config["num_key_value_heads"]) == ("llama", 64, 2)
    model, tok = load_any(ref)
    ids = random_windows(2, 16, vocab=len(TOKENS), seed=3)
    assert torch.equal(logits(model, ids), logits(AutoModelForCausalLM.from_pretrained(world / "hf"), ids))
    assert tok.chat_template == CHAT_TEMPLATE and tok.convert_ids_to_tokens(tok(" the in").input_ids) == ["Ġthe", "Ġ", "in"]
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")  # the GGUF loader's model refuses this; the rebuilt one does not


def test_a_gguf_file_is_recognised_by_its_magic_bytes_too(world, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes((world / "tiny.gguf").read_bytes())
    assert check_model(renamed).gguf.tensor_types == {"F32": 21}
    with pytest.raises(ModelNotFound, match="is a file, not a model folder"):
        check_model(world / "calib.txt")


def test_quantised_tensors_are_dequantised(world):
    model, _ = load_any(world / "tiny-q8.gguf")
    dense = tiny_model("llama", vocab_size=len(TOKENS)).model.layers[1].mlp.gate_proj.weight.detach().numpy()
    expected = dequantize(quantize(dense, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    got = model.model.layers[1].mlp.gate_proj.weight.detach().numpy()
    assert np.array_equal(got, expected) and not np.array_equal(got, dense)
    assert check_gguf(world / "tiny-q8.gguf").tensor_types == {"Q8_0": 16, "F32": 5}


def test_carve_of_a_gguf_is_the_carve_of_its_folder(world, tmp_path, capsys):
    """The same weights and tokenizer as a GGUF file and as a folder: the same carved folder, which
    loads both ways and keeps the file's tokenizer and chat template."""
    common = ["--config", "S1A1E4", "--calib", str(world / "calib.txt"), "--samples", "2", "--seqlen", "32"]
    assert main(["carve", str(world / "tiny.gguf"), "--out", str(tmp_path / "g"), *common]) == 0
    assert main(["carve", str(world / "hf"), "--out", str(tmp_path / "f"), *common]) == 0
    g, f = load_file(str(tmp_path / "g" / "model.safetensors")), load_file(str(tmp_path / "f" / "model.safetensors"))
    assert g.keys() == f.keys() and all(torch.equal(g[k], f[k]) for k in g)
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["model_type"] == "moecarve_llama" and "quantization_config" not in config
    assert config["moecarve"]["provenance"]["source"] == str(world / "tiny.gguf")
    assert (tmp_path / "g" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    ids = random_windows(2, 16, vocab=len(TOKENS), seed=5)
    ref = logits(moecarve.load(tmp_path / "g", kernels="none"), ids)  # the reference forward
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "g", trust_remote_code=True)
    torch.testing.assert_close(logits(remote, ids), ref, rtol=1e-5, atol=1e-6)  # its fast paths, where bound: to rounding


def test_eval_of_a_gguf_equals_eval_of_its_folder(world, tmp_path):
    ppl = ["--ppl", str(world / "calib.txt"), "--ppl-chars", "1000", "--ppl-seqlen", "64"]
    for name in ("tiny.gguf", "hf"):
        assert main(["eval", str(world / name), *ppl, "--json", str(tmp_path / f"{name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["perplexity"]["perplexity"] for n in ("tiny.gguf", "hf"))
    assert a == b


CARVE = ["carve", "MODEL", "--out", "out", "--config", "S1A1E4", "--calib", "calib.txt", "--samples", "2", "--seqlen", "32"]
ERRORS = [
    ("wrong magic", "magic.gguf", [], "magic.gguf is not a GGUF file: it starts with b'GGML'"),
    ("truncated", "cut.gguf", [], "cut.gguf is not a complete GGUF file (truncated or damaged"),
    ("unknown tensor type", "badtype.gguf", [], "holds a tensor of type 99, which gguf"),
    ("unsupported quantisation type", "f64.gguf", [], "quantisation type F64 (1 tensors, e.g. blk.0.ffn_up.weight)"),
    ("unsupported architecture", "rwkv.gguf", [], "architecture 'rwkv7' cannot be read by transformers"),
    ("architecture moecarve cannot carve", "bloom.gguf", [], "cannot carve model_type 'bloom'"),
    ("no tokenizer", "notok.gguf", [], "holds no tokenizer"),
    ("a tensor missing", "incomplete.gguf", [], "lacks 1 tensor(s) of the llama model, e.g. model.layers.1.mlp.down_proj.weight"),
    ("missing file", "nope.gguf", [], "GGUF file 'nope.gguf' does not exist"),
    ("streamed carve", "tiny.gguf", ["--offload", "disk"], "is a GGUF file, which is dequantised whole in memory first"),
    ("device map", "tiny.gguf", ["--device-map", "auto"], "--device-map places a model as it loads; 'tiny.gguf' is a GGUF"),
]  # fmt: skip


@pytest.mark.parametrize("name, model, extra, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_or_unsupported_gguf_is_one_line_and_writes_nothing(world, monkeypatch, capsys, name, model, extra, message):
    monkeypatch.chdir(world)
    argv = [model if a == "MODEL" else a for a in CARVE] + extra
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (world / "out").exists()


def test_layerwise_eval_of_a_gguf_is_refused(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["eval", "tiny.gguf", "--ppl", "calib.txt", "--layerwise"]) == 2
    assert "--layerwise reads safetensors one layer at a time; 'tiny.gguf' is a GGUF file" in capsys.readouterr().err


def test_inspect_of_a_gguf_says_to_carve_it(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["inspect", "tiny.gguf"]) == 2
    assert "tiny.gguf is a GGUF file, a dense model: carve it first" in capsys.readouterr().err


def test_api_errors_are_moecarve_errors(world):
    with pytest.raises(GGUFError, match="not a complete GGUF file"):
        check_model(world / "cut.gguf")
    with pytest.raises(UnsupportedGGUF, match="F64"):
        load_any(world / "f64.gguf")
    assert issubclass(UnsupportedGGUF, MoecarveError)  # the CLI prints these as one line, exit code 2
