"""The CLI end to end on the reference model, its help and flag vocabulary, progress in logs, and
bad inputs -> clear error, exit 2, no output (the full table is tests/test_cli_errors.py)."""

import io
import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

import moecarve
from moecarve.cli import COMMANDS, build_parser, main
from moecarve.cli.progress import LogLines
from moecarve.modules.moe import CarvedMoE

from tests.conftest import CALIB_TXT, REFERENCE_LM, ROOT, TEST_TXT, tiny_model

pytestmark = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")


def carve_args(model, out, *extra):
    return ["carve", str(model), "--out", str(out), "--samples", "2", "--seqlen", "128", *extra]


def test_carve_then_inspect(tmp_path, capsys):
    out = tmp_path / "c"
    ppl = ["--ppl", str(TEST_TXT), "--ppl-chars", "4000", "--ppl-seqlen", "64"]
    assert main(carve_args(REFERENCE_LM, out, "--config", "S1A3E8", "--calib", str(CALIB_TXT), *ppl)) == 0
    text, err = capsys.readouterr()
    assert "carve summary" in text and "parameters active per token" in text and "perplexity carved" in text
    # stderr is not a terminal here: the perplexity and carve bars print as plain lines
    assert re.search(r"^perplexity: 100%.*\|", err, re.M) and re.search(r"^carving S1A3E8: 100%", err, re.M), err
    assert (out / "config.json").exists() and (out / "modeling_moecarve.py").exists()
    assert main(["inspect", str(out)]) == 0
    assert "S1A3E8" in capsys.readouterr().out
    # an existing output is refused without --overwrite, and left untouched
    stamp = (out / "config.json").stat().st_mtime_ns
    assert main(carve_args(REFERENCE_LM, out)) == 2
    assert (out / "config.json").stat().st_mtime_ns == stamp


@pytest.fixture
def tiny_folder(tmp_path, reference_tokenizer):
    """Save a tiny random model (with the reference tokenizer) as a local model folder."""

    def make(arch, poison=False):
        model = tiny_model(arch, vocab_size=len(reference_tokenizer))
        if poison:
            with torch.no_grad():
                model.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))
        path = tmp_path / f"tiny-{arch}"
        model.save_pretrained(path)
        reference_tokenizer.save_pretrained(path)
        return path

    return make


def test_overwrite_replaces_a_folder_moecarve_wrote(tmp_path, tiny_folder, capsys):
    model, out = tiny_folder("llama"), tmp_path / "c"
    assert main(carve_args(model, out, "--config", "S1A1E4", "--calib", str(CALIB_TXT))) == 0
    assert main(carve_args(model, out, "--config", "S2A2E8", "--calib", str(CALIB_TXT), "--overwrite")) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "S2A2E8" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "tiny-llama"]  # no temporary folder left beside it


def _bert_folder(tmp_path, tok):
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)  # fmt: skip
    path = tmp_path / "bert"
    transformers.BertLMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tail_flag_sets_the_tail_and_0_leaves_it_out(tmp_path, tiny_folder, capsys):
    calib = str(short_texts(tmp_path)[0])
    for tail, expected in (("0.125", 0.125), ("0", 0.0)):
        out = tmp_path / f"c{tail}"
        argv = carve_args(tiny_folder("llama"), out, "--expert-size", "1", "--active", "0.25", "--tail", tail, "--calib", calib)
        assert main(argv) == 0
        config = json.loads((out / "config.json").read_text())["moecarve"]
        assert config["carve"]["tail"] == expected
        model = moecarve.load(out)
        moes = [m for m in model.modules() if isinstance(m, CarvedMoE)]
        assert moes and all((m.tail is not None) == (expected > 0) for m in moes)
        if expected:  # per token on average, an eighth of the FFN's 128 neurons
            assert all(abs(m.spec.tail_neurons - 16) < 0.05 for m in moes), [m.spec.tail_neurons for m in moes]
    argv = carve_args(tiny_folder("llama"), tmp_path / "bad", "--expert-size", "1", "--active", "0.25", "--tail", "0.9",
                      "--calib", calib)  # fmt: skip
    assert main(argv) == 2 and "exceeds" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "case,message",
    [
        ("unsupported", "cannot carve model_type 'bert'"),
        ("not_dividing", "do not divide the intermediate size"),
        ("bad_config", "cannot parse carving config"),
        ("empty_calib", "calibration text is empty"),
        ("short_calib", "needs at least"),
        ("missing_model", "does not exist"),
        ("missing_calib", "does not exist"),
        ("nan", "NaN"),
    ],
)
def test_bad_inputs_exit_2_without_output(case, message, tmp_path, tiny_folder, reference_tokenizer, capsys):
    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    model, extra = REFERENCE_LM, []
    if case == "unsupported":
        model = _bert_folder(tmp_path, reference_tokenizer)
    elif case == "not_dividing":
        extra = ["--config", "S2A2E7"]
    elif case == "bad_config":
        extra = ["--config", "2-2-8"]
    elif case == "empty_calib":
        calib.write_text("")
        extra = ["--calib", str(calib)]
    elif case == "short_calib":
        calib.write_text("only a few words of text")
        extra = ["--calib", str(calib)]
    elif case == "missing_model":
        model = tmp_path / "no-such-model"
    elif case == "missing_calib":
        extra = ["--calib", str(tmp_path / "no-such.txt")]
    elif case == "nan":
        model, extra = tiny_folder("llama", poison=True), ["--config", "S1A1E4"]
    assert main(carve_args(model, out, *extra)) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left


def test_help_explains_itself(capsys):
    assert main(["carve", "--help"]) == 0
    text = capsys.readouterr().out
    assert "S<shared>A<active>E<experts>" in text and "--calib" in text


def _help(command: str, capsys) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_its_default_once(command, capsys):
    text = _help(command, capsys)
    options = [b for b in re.split(r"\n  (?=-)", text.split("options:", 1)[1]) if b.strip()]  # one block per option
    for block in options:
        assert block.count("(default") <= 1, block
        assert "(default: None)" not in block and "(default: False)" not in block, block
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    for old in ("--eval-chars", "--eval-seqlen", "--max-chars", "--data"):  # hidden aliases stay out of help
        assert old not in text


def test_one_vocabulary_old_spellings_still_parse():
    parse = build_parser().parse_args
    new = parse(["carve", "m", "--out", "o", "--ppl", "t.txt", "--ppl-chars", "5", "--ppl-seqlen", "9"])
    old = parse(["carve", "m", "--out", "o", "--eval", "t.txt", "--eval-chars", "5", "--eval-seqlen", "9"])
    assert (new.ppl, new.ppl_chars, new.ppl_seqlen) == (old.ppl, old.ppl_chars, old.ppl_seqlen) == ("t.txt", 5, 9)
    ev = parse(["eval", "m", "--ppl", "t.txt", "--seqlen", "64", "--max-chars", "10"])
    assert (ev.ppl_seqlen, ev.ppl_chars) == (64, 10)
    assert parse(["finetune", "m", "--data", "t.txt", "--out", "o"]).calib == "t.txt"
    assert parse(["compare", "a", "b"]).out == "compare"  # a folder, like every other --out
    required = {"carve": ["--out", "o"], "eval": [], "compare": ["m2"], "finetune": ["--out", "o"],
                "condense": ["--out", "o", "--layers", "1"]}  # fmt: skip
    for command, extra in required.items():  # every command that loads a model
        args = parse([command, "m", *extra, "--revision", "r", "--trust-remote-code", "--device-map", "auto"])
        assert (args.revision, args.trust_remote_code, args.device_map) == ("r", True, "auto")
    assert parse(["compare", "a", "b", "--kernels", "auto"]).kernels == "auto"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("moecarve ")


def test_python_m_moecarve():
    run = subprocess.run([sys.executable, "-m", "moecarve", "--version"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.startswith("moecarve "), run.stderr


_LAZY = """
import sys, types
pkg = types.ModuleType("moecarve"); pkg.__path__ = [sys.argv[1]]; sys.modules["moecarve"] = pkg
from moecarve.cli import main
assert main(sys.argv[2:]) == 0
print(sorted(m for m in ("torch", "transformers", "datasets", "peft") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["carve", "--help"], ["eval", "--help"], ["frontier", "--help"], ["--version"],
                                  ["generate", "--help"], ["chat", "--help"], ["serve", "--help"], ["bench", "--help"]])
def test_help_imports_no_torch(argv):
    """The CLI's own modules import torch and transformers only inside commands. (The package's
    __init__ still imports the whole API: it is bypassed here so that the CLI is measured alone.)"""
    run = subprocess.run([sys.executable, "-c", _LAZY, str(ROOT / "moecarve"), *argv], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_progress_prints_lines_in_logs():
    """tqdm into a non-terminal: a line when the bar starts and one with its final state, not a
    line per redraw and not one long carriage-return line."""
    from tqdm import tqdm

    buf = io.StringIO()
    stream = LogLines(buf, every=3600)
    for _ in tqdm(range(50), desc="perplexity", file=stream, mininterval=0):
        pass
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in buf.getvalue()
    assert "0/50" in lines[0] and "50/50" in lines[1] and lines[1].startswith("perplexity: 100%")
    stream.write("plain text\n")
    assert buf.getvalue().endswith("plain text\n")


def test_load_windows_clips_to_the_model_as_the_cli_does(reference_tokenizer):
    cfg = moecarve.CalibConfig(n_samples=2, seqlen=4096)
    model = tiny_model("llama")  # max_position_embeddings 128
    assert moecarve.load_windows(reference_tokenizer, cfg, model=model).shape == (2, 128)
    assert moecarve.load_windows(reference_tokenizer, cfg, model=model.config).shape == (2, 128)


def test_calibration_text_is_tokenized_in_paragraph_pieces(reference_tokenizer):
    """The pieces join back to the text, each cut after a blank line; on the shipped corpus the reference
    tokenizer gives the same ids in pieces as in one call, so the windows are the whole text's."""
    from moecarve.calibration import embedded_corpus, paragraph_pieces, tokenize_windows

    text = embedded_corpus()[:400_000]
    pieces = paragraph_pieces(text, size=10_000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n\n") for p in pieces[:-1]) and all(len(p) >= 10_000 for p in pieces[:-1])
    assert paragraph_pieces("one line\nno blank lines", size=4) == ["one line\nno blank lines"]
    whole = reference_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.cat([reference_tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids[0] for p in pieces])
    assert torch.equal(ids, whole)
    windows = tokenize_windows(reference_tokenizer, text, 4, 64, seed=3)
    n_slots = whole.numel() // 64
    starts = torch.randperm(n_slots, generator=torch.Generator().manual_seed(3))[:4] * 64
    assert torch.equal(windows, torch.stack([whole[s : s + 64] for s in starts.tolist()]))


def test_error_messages_print_verbatim(monkeypatch, capsys):
    """Brackets in a message are text, not markup: "[n >= 1, seqlen >= 2]" once printed as "must be , got"."""
    from moecarve.cli import carve as carve_cmd
    from moecarve.errors import MoecarveError

    def fail(args):
        raise MoecarveError("training windows must be [n >= 1, seqlen >= 2], got (0, 64)")

    monkeypatch.setattr(carve_cmd, "run", fail)
    assert main(["carve", "m", "--out", "o"]) == 2
    assert capsys.readouterr().err == "error: training windows must be [n >= 1, seqlen >= 2], got (0, 64)\n"


@pytest.mark.parametrize("before,after,losses,warned", [(88.8, 8192.0, [4.5, 9.0], True), (20.0, 18.0, [3.0, 2.9], False),
                                                        (20.0, 18.0, [3.0, float("nan")], True)])  # fmt: skip
def test_a_diverged_finetune_is_reported(before, after, losses, warned, caplog):
    from types import SimpleNamespace

    from moecarve.cli.finetune import warn_if_diverged

    warn_if_diverged(SimpleNamespace(ppl_before=before, ppl_after=after, losses=losses), lr=2e-4)
    assert any("diverged" in r.getMessage() for r in caplog.records) == warned


def carved_folder(tmp_path, tok):
    """A tiny llama carved at S1A1E4 by cmoe (shared experts: condensable), saved with the
    reference tokenizer, and a training text; (folder, text)."""
    vocab = len(tok)
    model = tiny_model("llama", vocab_size=vocab)
    windows = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    moecarve.carve(model, moecarve.CarveConfig.from_string("S1A1E4", method="cmoe"), windows, progress=False)
    moecarve.save(model, tmp_path / "carved", tokenizer=tok)
    data = tmp_path / "train.txt"
    data.write_text(CALIB_TXT.read_text()[:20_000])
    return tmp_path / "carved", data


def test_finetune_no_merge_saves_the_adapter_alone(tmp_path, reference_tokenizer, capsys):
    carved, data = carved_folder(tmp_path, reference_tokenizer)
    args = ["finetune", str(carved), "--calib", str(data), "--samples", "2", "--seqlen", "32", "--heldout", "0",
            "--batch-size", "2", "--out", str(tmp_path / "adapter"), "--no-merge", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune_report.json"} <= names
    assert not any(n.startswith("model") for n in names)  # the adapter alone, no merged weights


def short_texts(tmp_path):
    """(calib.txt, test.txt): slices of the corpus, so that tokenizing them costs nothing."""
    calib, test = tmp_path / "calib.txt", tmp_path / "test.txt"
    calib.write_text(CALIB_TXT.read_text()[:20_000])
    test.write_text(TEST_TXT.read_text()[:3_000])
    return calib, test


PERPLEXITY_ROW = r"\| perplexity \(`test.txt`, seq (\d+)\) \| source [\d.]+ → this model [\d.]+ \|"


def test_carve_by_expert_size_with_threshold_selection(tmp_path, tiny_folder, capsys):
    """--expert-size/--active/--shared resolve to the S/A/E spec from config.json's FFN width;
    the folder's card names the texts; inspect shows what the folder holds."""
    model, out = tiny_folder("llama"), tmp_path / "c"
    calib, test = short_texts(tmp_path)
    argv = carve_args(model, out, "--expert-size", "16", "--active", "0.5", "--shared", "0.25", "--selection", "threshold",
                      "--calib", str(calib), "--ppl", str(test), "--ppl-seqlen", "64")  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "--expert-size 16 on intermediate size 128: S2A2E8 (2 shared + 2 routed of 8 experts" in text
    carve = json.loads((out / "config.json").read_text())["moecarve"]["carve"]
    assert (carve["n_shared"], carve["n_active"], carve["n_experts"], carve["selection"]) == (2, 2, 8, "threshold")
    card = (out / "README.md").read_text()
    assert f"| source model | `{model}` |" in card and "| calibration | calib.txt, 2 × 128 tokens |" in card
    assert re.search(PERPLEXITY_ROW, card).group(1) == "64"
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    for word in ("moecarve_llama", "MoeCarveLlamaForCausalLM", "4-bit", "selection=threshold,", "shadow_bias=True,",
                 "provenance", "torch", "shared mean |h|", "routed mean |h|"):  # fmt: skip
        assert word in shown, word
    for word in ("router=", "k_act=", "probes_per_expert=", "kmeans_iters="):  # not read by the fitted shadow router
        assert word not in shown, word


def test_no_shadow_bias_carves_without_it(tmp_path, tiny_folder, capsys):
    out = tmp_path / "c"
    argv = carve_args(tiny_folder("llama"), out, "--expert-size", "16", "--active", "0.5", "--no-shadow-bias",
                      "--calib", str(short_texts(tmp_path)[0]))  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())["moecarve"]
    assert config["carve"]["shadow_bias"] is False
    assert all(entry["shadow_bias"] is False for entry in config["modules"].values()), config["modules"]
    model = moecarve.load(out)
    assert all(m.router.in_bias is None and m.router.input_mean is None for m in model.modules() if isinstance(m, CarvedMoE))


@pytest.mark.parametrize(
    "extra,shown,hidden",
    [
        (["--config", "S2A0E4"], ["none", "refit=True,", "static"], ["shadow_bits=", "router=", " nan "]),
        (["--config", "S1A1E4", "--method", "cmoe"], ["router=analytic,", "k_act=10,", "analytic", "activation rate"],
         ["profile_iters=", "shadow_bits=", "refit=", " nan "]),
    ],
)  # fmt: skip
def test_summary_and_inspect_show_what_applies(extra, shown, hidden, tmp_path, tiny_folder, capsys):
    """Static pruning has no router or routed figures (no " nan "); each method lists only its settings."""
    out = tmp_path / "c"
    assert main(carve_args(tiny_folder("llama"), out, "--calib", str(short_texts(tmp_path)[0]), *extra)) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for word in shown:
        assert word in text, word
    for word in hidden:
        assert word not in text, word


def test_finetune_and_condense_write_cards(tmp_path, reference_tokenizer):
    carved, data = carved_folder(tmp_path, reference_tokenizer)
    test = short_texts(tmp_path)[1]
    common = ["--calib", str(data), "--samples", "2", "--seqlen", "32", "--ppl", str(test), "--ppl-seqlen", "32",
              "--device", "cpu"]  # fmt: skip
    ft = ["finetune", str(carved), "--heldout", "2", "--batch-size", "2", "--out", str(tmp_path / "ft"), *common]
    assert main(ft) == 0
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "Fine-tuned by `moecarve finetune`: LoRA r=8" in card and "1 step on 2 × 32 tokens of `train.txt`" in card
    assert re.search(PERPLEXITY_ROW, card).group(1) == "32"
    cd = ["condense", str(carved), "--layers", "1", "--experts", "1", "--out", str(tmp_path / "cd"), *common]
    assert main(cd) == 0
    card = (tmp_path / "cd" / "README.md").read_text()
    assert "| calibration | train.txt |" in card and "Condensed (CD-MoE)" in card
    assert re.search(PERPLEXITY_ROW, card).group(1) == "32"
