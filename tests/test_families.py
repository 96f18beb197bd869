"""Today's model families (issue 27): every gated-MLP family of the adapter table carves, saves and
reloads (moecarve.load and trust_remote_code) to the logits of the carve in memory, keeps its own
config fields, streams like it carves in memory; layers of different types (sliding-window and full
attention, Gemma 3's local and global rotary embeddings) are calibrated on their own arguments."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import moecarve
from moecarve import adapters
from moecarve.capture import first_layer_inputs, run_layer
from moecarve.export import ExportError, export
from moecarve.modules.moe import CarvedMoE

from .conftest import TINY, random_windows, tiny_model

# the families added for issue 27 (llama, mistral, qwen2/3, gemma/gemma2, phi3, gpt2, opt: tests/test_io.py, test_hf.py)
FAMILIES = ["gemma3_text", "gemma3", "vaultgemma", "llama3", "granite", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "glm",
            "glm4", "smollm3", "ministral", "ministral3", "exaone4", "helium", "stablelm", "seed_oss", "hunyuan_v1_dense",
            "ernie4_5"]  # fmt: skip
# what moecarve rewrites in a carved config.json; every other field must survive the carve
REWRITTEN = {"model_type", "architectures", "auto_map", "transformers_version", "moecarve", "dtype"}


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits


def carve(name: str, spec: str = "S1A1E4", **settings):
    """(model, report): a tiny random model of family `name` carved in memory by the default method."""
    model = tiny_model(name)
    cfg = moecarve.CarveConfig.from_string(spec, **settings)
    return model, moecarve.carve(model, cfg, random_windows(2, 32), device="cpu", progress=False)


def test_every_family_is_in_the_adapter_table():
    assert set(FAMILIES) - {"llama3"} <= set(adapters.supported())
    assert set(FAMILIES) <= set(TINY)


@pytest.mark.parametrize("name", FAMILIES)
def test_carve_save_load_equal_logits_and_config_kept(name, tmp_path):
    model, report = carve(name)
    assert sum(isinstance(m, CarvedMoE) for m in model.modules()) == len(adapters.decoder_layers(model)) == len(report.layers)
    source = TINY[name]().to_diff_dict()  # what save_pretrained writes: the fields that differ from the defaults
    ids = random_windows(2, 20, seed=7)
    ref = logits(model, ids)
    out = moecarve.save(model, tmp_path / name, report=report)
    assert torch.equal(logits(moecarve.load(out, kernels="none"), ids), ref)  # the reference forward: bit for bit
    torch.testing.assert_close(logits(moecarve.load(out), ids), ref, rtol=1e-5, atol=1e-6)  # the C kernels: to rounding
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == f"MoeCarve{type(model).__name__}"
    torch.testing.assert_close(logits(remote, ids), ref, rtol=1e-5, atol=1e-6)  # its fast paths, where bound: to rounding
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == f"moecarve_{source['model_type']}"
    kept = {k: v for k, v in source.items() if k not in REWRITTEN}
    assert {k: saved.get(k) for k in kept} == json.loads(json.dumps(kept))
    assert {"layer_types", "sliding_window"} <= set(kept) or "layer_types" not in TINY[name]().to_dict()


def test_activation_is_read_from_the_config():
    """GeGLU families name it hidden_activation (multimodal Gemma 3: in its text config); the carved
    modules compute with the one the config names, not a family default."""
    for name, key in (("gemma3_text", "hidden_activation"), ("gemma3", "text_config.hidden_activation"), ("granite", "hidden_act")):
        model = tiny_model(name)
        assert adapters.activation_name(model.config) == ("silu" if name == "granite" else "gelu_pytorch_tanh")
        owner, _, attr = f"config.{key}".rpartition(".")
        setattr(adapters._lookup(model, owner), attr, "relu")
        assert adapters.read_ffn(model.config, adapters.decoder_layers(model)[0]).act == "relu"
        moecarve.carve(model, moecarve.CarveConfig.from_string("S1A1E4"), random_windows(2, 16), device="cpu", progress=False)
        assert {m.spec.act for m in model.modules() if isinstance(m, CarvedMoE)} == {"relu"}


@pytest.mark.parametrize("name", ["gemma3_text", "gemma2", "cohere2"])
def test_every_layer_type_is_propagated_with_its_own_arguments(name):
    """Sliding-window and full-attention layers get different masks (and Gemma 3 different rotary
    embeddings): the calibration windows propagated layer by layer equal the model's own hidden states."""
    model = tiny_model(name)
    model.config.num_hidden_layers = 3
    if name == "gemma2":
        model.config.sliding_window = 8
    model.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(model.config).float().eval()
    windows = random_windows(2, 32, seed=4)
    with torch.no_grad():
        expected = model(windows, output_hidden_states=True).hidden_states
    inputs = first_layer_inputs(model, windows, torch.device("cpu"))
    layers = adapters.decoder_layers(model)
    assert [layer for layer, _ in inputs.layer_kwargs] == [layers[1]]  # the full layer; layer 2 shares layer 0's
    for i in range(2):  # the last entry of hidden_states is after the final norm
        inputs.hidden, _ = run_layer(layers[i], inputs, torch.device("cpu"))
        torch.testing.assert_close(inputs.hidden, expected[i + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3", "glm", "granite"])
def test_streamed_carve_equals_in_memory(name, tmp_path):
    """--offload disk: GeGLU with sliding layers, a multimodal checkpoint transformers saves under other
    tensor names, a fused gate_up projection, multipliers."""
    dense = tmp_path / "dense"
    tiny_model(name).save_pretrained(dense)
    cfg, windows = moecarve.CarveConfig.from_string("S1A1E4", score_weight="down"), random_windows(2, 32)  # a streamed carve's weights
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    moecarve.carve(model, cfg, windows, device="cpu", progress=False)
    moecarve.carve_streamed(dense, cfg, windows, tmp_path / "streamed", device="cpu", progress=False)
    ids = random_windows(2, 20, seed=7)
    assert torch.equal(logits(moecarve.load(tmp_path / "streamed", kernels="none"), ids), logits(model, ids))


def test_gemma3_fast_kernels_and_condense(tmp_path):
    """A carved Gemma 3 runs through the fast kernels (GeGLU) and condenses (CD-MoE), and the condensed
    model reloads exactly."""
    model, _ = carve("gemma3_text")
    ids = random_windows(2, 20, seed=7)
    out = moecarve.save(model, tmp_path / "carved")
    torch.testing.assert_close(logits(moecarve.load(out, kernels="auto"), ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    report = moecarve.condense(model, moecarve.CondenseConfig(n_layers=1, n_experts=1), random_windows(2, 16), progress=False)
    assert len(report.layers) == 1
    ref = logits(model, ids)
    again = moecarve.load(moecarve.save(model, tmp_path / "condensed"), kernels="none")
    assert torch.equal(logits(again, ids), ref)


def test_export_names_the_family_it_cannot_express(tmp_path):
    model, _ = carve("gemma3_text")  # the family is refused before the router is looked at
    with pytest.raises(ExportError, match="model_type 'gemma3_text'.*supported sources: llama, mistral, qwen2"):
        export(model, "qwen2_moe", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_families_with_more_than_an_mlp_are_refused():
    """Gemma 4 feeds every layer its own per-token inputs; BitNet normalises inside the MLP: not in the table."""
    for config in (transformers.Gemma4TextConfig(), transformers.BitNetConfig()):
        with pytest.raises(adapters.UnsupportedArchitecture, match=config.model_type):
            adapters.adapter_for(config)
