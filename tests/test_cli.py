"""The CLI end to end on the reference model, and every bad input -> clear error, exit 2, no output."""

import pytest
import torch
import transformers

from moecarve.cli import main

from tests.conftest import CALIB_TXT, REFERENCE_LM, tiny_model

pytestmark = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")


def carve_args(model, out, *extra):
    return ["carve", str(model), "--out", str(out), "--samples", "2", "--seqlen", "128", *extra]


def test_carve_then_inspect(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(carve_args(REFERENCE_LM, out, "--config", "S1A3E8", "--calib", str(CALIB_TXT))) == 0
    text = capsys.readouterr().out
    assert "carve summary" in text and "parameters active per token" in text
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


def _bert_folder(tmp_path, tok):
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)  # fmt: skip
    path = tmp_path / "bert"
    transformers.BertLMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
    with pytest.raises(SystemExit) as e:
        main(["carve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "S<shared>A<active>E<experts>" in text and "--calib" in text
