"""Export to Qwen2-MoE and the fitted linear router.

What must hold: the exported folder loads in plain transformers (no trust_remote_code, no moecarve
key), computes moecarve's linear-router model to 1e-4 in float32, generates; and every source
setting that would not carry over exactly is refused with a clear error.
"""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from moecarve import CarveConfig, ConfigError, carve, save
from moecarve.carving.linear_router import combine_weights, expert_outputs, fit_linear_router, routing_error
from moecarve.carving.methods import carve_ffn
from moecarve.cli import main
from moecarve.export import ExportError, export
from moecarve.io.atomic import OutputExists
from moecarve.modules.moe import CarvedMoE

from tests.conftest import CALIB_TXT, REFERENCE_LM, random_windows, tiny_model


def carved(arch: str, spec: str = "S2A2E8", router: str = "linear", seed: int = 0):
    model = tiny_model(arch, seed=seed)
    carve(model, CarveConfig.from_string(spec, method="cmoe", router=router), random_windows(2, 32), device="cpu", progress=False)
    return model


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


# ---- the linear router ----------------------------------------------------------------------


def test_router_choice_is_validated():
    assert CarveConfig(method="cmoe", router="linear").router == "linear"
    with pytest.raises(ConfigError, match="unknown router"):
        CarveConfig(method="cmoe", router="mlp")
    with pytest.raises(ConfigError, match="method 'cmoe'"):
        CarveConfig(method="fitted", router="linear")  # the fitted method builds its own router


def test_combine_weights_equal_logits_weigh_one_and_sum_to_top_k():
    logits = torch.randn(50, 6)
    w = combine_weights(logits, 2)
    assert torch.equal((w > 0).sum(-1), torch.full((50,), 2))
    torch.testing.assert_close(w.sum(-1), torch.full((50,), 2.0))
    flat = combine_weights(torch.zeros(3, 6), 2)  # CMoE's weights: every selected expert weighs 1
    assert set(flat.unique().tolist()) == {0.0, 1.0}
    # the straight-through term changes gradients only, never the value
    st = combine_weights(logits.requires_grad_(True), 2, straight_through=True)
    torch.testing.assert_close(st.detach(), w)


def _ffn_and_inputs():
    from moecarve import adapters

    model = tiny_model("llama")
    ffn = adapters.read_ffn(model.config, model.model.layers[0])
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    return ffn, x


def _grouping(ffn, x, cfg):
    from moecarve.carving.grouping import group_neurons
    from moecarve.carving.stats import activation_markers, activation_rates

    markers = activation_markers(ffn, x, cfg.k_act)
    return group_neurons(markers, activation_rates(markers), cfg.n_shared, cfg.n_routed, cfg.kmeans_iters)


def test_fitted_router_module_computes_the_fitting_objective():
    """The module carve builds is what the fit optimised: shared + sum_e G_e(x) * expert_e(x)."""
    from moecarve.carving.methods import build_moe, moe_spec

    ffn, x = _ffn_and_inputs()
    cfg = CarveConfig.from_string("S2A2E8", method="cmoe", router="linear")
    g, spec = _grouping(ffn, x, cfg), moe_spec(ffn, cfg)
    moe = build_moe(ffn, g, spec, fit_linear_router(ffn, g, x, spec, steps=20))
    assert moe.spec.router == "linear" and moe.spec.norm_topk_prob
    with torch.no_grad():
        y = expert_outputs(ffn, g, x)  # [T, E, d]
        G = combine_weights(torch.nn.functional.linear(x, moe.router.weight), 2)
        torch.testing.assert_close(moe(x), torch.einsum("te,ted->td", G, y) + moe.shared(x), atol=1e-5, rtol=1e-4)
        # and the dense FFN is the all-ones combination
        torch.testing.assert_close(y.sum(1) + moe.shared(x), ffn(x), atol=1e-5, rtol=1e-4)
    # carve_ffn wires the same fit in
    carved_moe, _ = carve_ffn(ffn, x, cfg)
    assert isinstance(carved_moe.router, type(moe.router)) and carved_moe.spec.norm_topk_prob


def test_optimisation_never_ends_worse_than_the_least_squares_start():
    from moecarve.carving.methods import moe_spec

    ffn, x = _ffn_and_inputs()
    cfg = CarveConfig.from_string("S1A1E8", method="cmoe", router="linear")
    g = _grouping(ffn, x, cfg)
    y = expert_outputs(ffn, g, x)
    start = fit_linear_router(ffn, g, x, moe_spec(ffn, cfg), steps=0)
    fitted = fit_linear_router(ffn, g, x, moe_spec(ffn, cfg), steps=50)
    assert fitted["weight"].shape == (7, 64) and torch.equal(fitted["scale"], torch.zeros(7))  # A - 1 = 0
    e0, e1 = routing_error(start["weight"], x, y, 1), routing_error(fitted["weight"], x, y, 1)
    assert e1 <= e0
    # deterministic
    again = fit_linear_router(ffn, g, x, moe_spec(ffn, cfg), steps=50)
    assert torch.equal(again["weight"], fitted["weight"])


# ---- export: exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_export_loads_in_plain_transformers_and_matches(arch, tmp_path):
    model = carved(arch)
    out = export(model, "qwen2_moe", tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and "moecarve" not in cfg and "auto_map" not in cfg
    assert not list(out.glob("*.py")) and not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(q) is transformers.Qwen2MoeForCausalLM
    ids = random_windows(2, 40, seed=5)
    assert max_logit_diff(model, q, ids) < 1e-4
    a = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    b = q.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(a, b) and b.shape[1] == 14


def test_export_has_a_model_card_and_ordinary_permissions(tmp_path):
    import os

    import yaml

    model = carved("llama")
    old = os.umask(0o022)
    try:
        out = export(model, "qwen2_moe", tmp_path / "q", card={"source": "org/dense-model", "calibration": "calib.txt"})
    finally:
        os.umask(old)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "org/dense-model" and {"moe", "moecarve", "qwen2_moe"} <= set(front["tags"])
    assert "standard `qwen2_moe` architecture" in text and "S2A2E8, method cmoe, router linear" in text
    assert 'AutoModelForCausalLM.from_pretrained("q")' in text and "trust_remote_code" not in text
    assert json.loads((out / "moecarve_export.json").read_text())["provenance"]["source"] == "org/dense-model"
    assert out.stat().st_mode & 0o777 == 0o755 and {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_trained_router_scale_no_shared_experts_and_dense_layers_map_exactly(tmp_path):
    """Per-expert router scales fold into down_proj; N_s = 0 gives a zero shared expert; a layer
    left dense becomes an mlp_only_layer."""
    dense_mlp = tiny_model("llama").model.layers[1].mlp
    model = carved("llama", spec="S0A3E8")
    model.model.layers[1].mlp = dense_mlp
    with torch.no_grad():
        model.model.layers[0].mlp.router.scale.copy_(torch.linspace(-0.5, 1.5, 8))
    q = AutoModelForCausalLM.from_pretrained(export(model, "qwen2_moe", tmp_path / "q"), dtype=torch.float32)
    assert q.config.mlp_only_layers == [1] and q.config.num_experts == 8 and q.config.num_experts_per_tok == 3
    assert max_logit_diff(model, q.eval(), random_windows(2, 40, seed=6)) < 1e-4


# ---- export: refusals ----------------------------------------------------------------------------


def test_analytic_router_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ExportError, match="--router linear"):
        export(carved("llama", router="analytic"), "qwen2_moe", tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch", ["gemma", "qwen3", "phi3"])
def test_other_decoder_layers_are_refused(arch, tmp_path):
    with pytest.raises(ExportError, match="supported sources"):
        export(carved(arch), "qwen2_moe", tmp_path / "q")


def test_settings_that_do_not_carry_over_are_refused(tmp_path):
    model = carved("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias[0] = 0.1
    with pytest.raises(ExportError, match="selection bias"):
        export(model, "qwen2_moe", tmp_path / "a")
    model = carved("mistral")
    model.config.sliding_window = 16
    with pytest.raises(ExportError, match="sliding-window"):
        export(model, "qwen2_moe", tmp_path / "b")
    model = carved("llama")
    model.config.attention_bias = True
    with pytest.raises(ExportError, match="o_proj bias"):
        export(model, "qwen2_moe", tmp_path / "c")
    with pytest.raises(ExportError, match="unknown export format"):
        export(model, "mixtral9", tmp_path / "d")
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model = carved("llama")
    (tmp_path / "q").mkdir()
    with pytest.raises(OutputExists):
        export(model, "qwen2_moe", tmp_path / "q")
    export(model, "qwen2_moe", tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "config.json").exists()


# ---- the reference model, from a saved folder, through the CLI ----------------------------------

needs_reference = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")


@needs_reference
def test_reference_model_cli_carve_export_matches(tmp_path, capsys):
    out, exp = tmp_path / "c", tmp_path / "c-qwen2_moe"
    args = ["carve", str(REFERENCE_LM), "--out", str(out), "--samples", "2", "--seqlen", "128", "--calib", str(CALIB_TXT),
            "--config", "S2A2E8", "--method", "cmoe", "--router", "linear", "--export", "qwen2_moe"]  # fmt: skip
    assert main(args) == 0
    assert "vllm serve" in capsys.readouterr().out
    ref = transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_LM)
    q = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    assert q.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert (exp / "tokenizer.json").exists() or (exp / "tokenizer_config.json").exists()
    from moecarve import load

    mine = load(out, dtype=torch.float32)
    assert all(m.spec.router == "linear" for m in mine.modules() if isinstance(m, CarvedMoE))
    tok = transformers.AutoTokenizer.from_pretrained(exp)
    ids = tok(CALIB_TXT.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    assert max_logit_diff(mine, q, ids) < 1e-4
    assert q.generate(ids[:, :8], max_new_tokens=5, do_sample=False).shape[1] == 13
    # the export subcommand writes the same weights from the saved folder
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    q2 = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    assert max_logit_diff(q, q2, ids[:, :64]) == 0.0


@needs_reference
def test_cli_refuses_export_of_an_analytic_carve_before_any_work(tmp_path, capsys):
    args = ["carve", str(REFERENCE_LM), "--out", str(tmp_path / "c"), "--export", "qwen2_moe"]
    assert main(args) == 2
    assert "--method cmoe --router linear" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2
