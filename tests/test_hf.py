"""Carved folders as Hugging Face citizens: their own architecture (plain transformers refuses them,
remote code and moecarve.load work), save_pretrained round trips, one config writer for in-memory
and streamed carves, model cards, provenance, file permissions."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM

import moecarve
from moecarve.io.card import CardInfo
from tests.conftest import random_windows, tiny_model

AUTO_MAP = {"AutoConfig": "modeling_moecarve.MoeCarveLlamaConfig",
            "AutoModelForCausalLM": "modeling_moecarve.MoeCarveLlamaForCausalLM"}  # fmt: skip


@pytest.fixture(scope="module")
def carved(tmp_path_factory):
    """(folder, model, report): a tiny llama carved at S1A2E8 (2m = 32 != d = 64) and saved."""
    model = tiny_model("llama")
    report = moecarve.carve(model, moecarve.CarveConfig.from_string("S1A2E8"), random_windows(), progress=False)
    out = tmp_path_factory.mktemp("hf") / "carved"
    moecarve.save(model, out, report=report)
    return out, model, report


def config_json(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits


def test_carved_folder_names_its_own_architecture(carved):
    out, _, _ = carved
    cfg = config_json(out)
    assert cfg["model_type"] == "moecarve_llama" and cfg["architectures"] == ["MoeCarveLlamaForCausalLM"]
    assert cfg["auto_map"] == AUTO_MAP
    assert cfg["moecarve"]["base_class"] == "LlamaForCausalLM"
    source = (out / "modeling_moecarve.py").read_text()
    assert not any(ln.startswith(("from .", "import moecarve", "from moecarve")) for ln in source.splitlines())
    compile(source, "modeling_moecarve.py", "exec")


def test_plain_transformers_refuses_instead_of_loading_random_ffns(carved, monkeypatch):
    out, _, _ = carved
    # no interactive prompt: answer as a non-interactive session does
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    with pytest.raises(ValueError, match="custom code.*trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("via", ["moecarve.load", "trust_remote_code"])
def test_save_pretrained_of_a_loaded_model_reloads(carved, tmp_path, via):
    out, model, _ = carved
    ids = random_windows(2, 20, seed=7)
    if via == "moecarve.load":
        loaded = moecarve.load(out)
        assert isinstance(loaded.config, transformers.LlamaConfig) and loaded.config.model_type == "llama"
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert loaded.config.model_type == "moecarve_llama"
    assert type(loaded).__name__ == "MoeCarveLlamaForCausalLM"
    loaded.save_pretrained(tmp_path / "again")
    again = tmp_path / "again"
    assert (again / "modeling_moecarve.py").read_text() == (out / "modeling_moecarve.py").read_text()
    cfg = config_json(again)
    assert (cfg["model_type"], cfg["auto_map"]) == ("moecarve_llama", AUTO_MAP)
    ref = logits(model, ids)
    assert torch.equal(logits(moecarve.load(again), ids), ref)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True), ids), ref)


def test_folder_of_the_earlier_format_still_loads(carved, tmp_path):
    """Folders written before carved models named their own type (model_type "llama", auto_map for
    the model only) load through moecarve.load, and save_pretrained writes them in the new format."""
    out, model, _ = carved
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = config_json(old)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"],
               auto_map={"AutoModelForCausalLM": AUTO_MAP["AutoModelForCausalLM"]})  # fmt: skip
    del cfg["moecarve"]["provenance"]
    (old / "config.json").write_text(json.dumps(cfg))
    ids = random_windows(1, 16, seed=2)
    loaded = moecarve.load(old)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    loaded.save_pretrained(tmp_path / "new")
    assert config_json(tmp_path / "new")["model_type"] == "moecarve_llama"


def test_streamed_and_in_memory_carves_write_the_same_config_and_card(tmp_path):
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    cfg, windows = moecarve.CarveConfig.from_string("S1A1E4", method="cmoe"), random_windows()
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    report = moecarve.carve(model, cfg, windows, device="cpu", progress=False)
    card = {"calibration": "random tokens"}
    moecarve.save(model, tmp_path / "memory" / "c", report=report, card=card)
    moecarve.carve_streamed(dense, cfg, windows, tmp_path / "streamed" / "c", device="cpu", progress=False, card=card)
    a, b = (config_json(tmp_path / kind / "c") for kind in ("memory", "streamed"))
    assert a == b
    assert a["moecarve"]["provenance"]["source"] == str(dense.resolve())
    assert (tmp_path / "memory" / "c" / "README.md").read_text() == (tmp_path / "streamed" / "c" / "README.md").read_text()


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_and_provenance(carved, tmp_path):
    _, model, report = carved
    card = CardInfo(source="HuggingFaceTB/SmolLM2-135M", revision="abc123", calibration="calib.txt",
                    eval_source="test.txt", eval_seqlen=512, ppl_before=4.417, ppl_after=24.33)  # fmt: skip
    out = moecarve.save(model, tmp_path / "c", report=report, card=card)
    text = (out / "README.md").read_text()
    front = front_matter(text)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M" and front["library_name"] == "transformers"
    assert {"moe", "moecarve", "cmoe", "fitted"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
    for line in ["| source model | `HuggingFaceTB/SmolLM2-135M` (revision `abc123`) |",
                 "| configuration | S1A2E8: 8 experts of 16 neurons per FFN, 1 shared (always on) + 2 of 7 routed",
                 "| calibration | calib.txt, 2 × 32 tokens |",
                 "| perplexity (`test.txt`, seq 512) | source 4.417 → this model 24.330 |",
                 "grouped by their \\|h\\| profiles", "shadow: a 4-bit copy"]:  # fmt: skip
        assert line in text
    prov = config_json(out)["moecarve"]["provenance"]
    assert prov == {"source": "HuggingFaceTB/SmolLM2-135M", "revision": "abc123", "moecarve": moecarve.__version__,
                    "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    # a re-saved model keeps its dense source; a local source is no hub id: no base_model
    again = moecarve.save(moecarve.load(out), tmp_path / "again")
    assert config_json(again)["moecarve"]["provenance"]["source"] == "HuggingFaceTB/SmolLM2-135M"
    local = moecarve.save(model, tmp_path / "local", card={"source": str(tmp_path)})
    assert "base_model" not in front_matter((local / "README.md").read_text())


def test_output_permissions_are_ordinary(carved, tmp_path):
    _, model, report = carved
    old = os.umask(0o022)
    try:
        out = moecarve.save(model, tmp_path / "c", report=report)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_load_tokenizer_reads_a_carved_folder_without_asking_for_remote_code(carved, tmp_path, monkeypatch, reference_tokenizer):
    _, model, _ = carved
    out = moecarve.save(model, tmp_path / "c", tokenizer=reference_tokenizer)
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run remote code"))
    from moecarve.io.save import load_tokenizer

    assert load_tokenizer(out)("hello world").input_ids == reference_tokenizer("hello world").input_ids
