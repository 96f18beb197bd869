"""Carving: equivalence with the dense FFN when every expert is on, structure, report, errors."""

import pytest
import torch

from moecarve import CarveConfig, carve
from moecarve.adapters import UnsupportedArchitecture, decoder_layers, read_ffn
from moecarve.carving.ffn import DenseFFN
from moecarve.carving.methods import CarveError, carve_ffn
from moecarve.modules.moe import CarvedMoE

from .conftest import TINY, random_windows, tiny_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_all_experts_on_reproduces_dense_model(arch):
    """With A = N - N_s every neuron is computed with weight 1: the carved model is the dense model."""
    model = tiny_model(arch)
    ids = random_windows(2, 24, seed=1)
    with torch.no_grad():
        dense = model(ids).logits
        dense_ffn = [read_ffn(model.config, layer) for layer in decoder_layers(model)]
        dense_ffn = [DenseFFN(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(f).items()}) for f in dense_ffn]
    report = carve(model, CarveConfig.from_string("S1A3E4"), random_windows(2, 32), device="cpu", progress=False)
    moes = [m for m in model.modules() if isinstance(m, CarvedMoE)]
    assert len(moes) == model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else 2
    x = torch.randn(7, dense_ffn[0].hidden_size)
    with torch.no_grad():
        for f, moe in zip(dense_ffn, moes):  # layer by layer
            assert _rel(moe(x), f(x)) < 1e-5
        assert _rel(model(ids).logits, dense) < 1e-5
    assert len(report.layers) == len(moes)


def test_carved_layer_is_partition_of_dense_weights():
    torch.manual_seed(0)
    d, inter = 32, 64
    ffn = DenseFFN(up=torch.randn(inter, d), down=torch.randn(d, inter), gate=torch.randn(inter, d), act="silu")
    moe, rep = carve_ffn(ffn, torch.randn(300, d), CarveConfig.from_string("S2A2E8", selection="topk"))  # exactly A per token
    m = 8
    rows = torch.cat([moe.shared.in_proj[: 2 * m], moe.experts.in_proj[:, :m].reshape(-1, d)])  # gate rows
    # every gate row of the dense FFN appears exactly once
    match = (rows[:, None, :] == ffn.gate[None]).all(-1)
    assert match.sum(0).tolist() == [1] * inter and match.sum(1).tolist() == [1] * inter
    assert sum(rep.load) == 300 * 2 and rep.expert_size == m
    # the router starts with weight exactly 1 per selected expert
    w, idx = moe.router(torch.randn(5, d))
    assert torch.equal(w, torch.ones_like(w)) and idx.shape == (5, 2)


def test_partial_activation_is_sparse_sum_of_experts():
    """S1A1E4: output = shared + exactly the selected expert's contribution."""
    torch.manual_seed(0)
    d, inter = 16, 32
    ffn = DenseFFN(up=torch.randn(inter, d), down=torch.randn(d, inter), gate=torch.randn(inter, d), act="silu")
    moe, _ = carve_ffn(ffn, torch.randn(200, d), CarveConfig.from_string("S1A1E4", selection="topk", tail=0.0))
    x = torch.randn(9, d)
    _, idx = moe.router(x)
    e = moe.experts
    manual = moe.shared(x).clone()
    for t in range(9):
        j = idx[t, 0]
        g, u = (e.in_proj[j] @ x[t]).chunk(2)
        manual[t] += e.out_proj[j] @ (torch.nn.functional.silu(g) * u)
    torch.testing.assert_close(moe(x), manual, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_names_supported():
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.BertLMHeadModel(cfg)
    with pytest.raises(UnsupportedArchitecture, match="llama.*qwen2"):
        carve(model, CarveConfig.from_string("S1A1E4"), random_windows(), progress=False)


def test_nan_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))
    with pytest.raises(CarveError, match="layer 0.*NaN"):
        carve(model, CarveConfig.from_string("S1A1E4"), random_windows(), progress=False)


def test_bad_calibration_and_config_fail_before_work():
    model = tiny_model("llama")
    with pytest.raises(CarveError, match="LongTensor"):
        carve(model, CarveConfig.from_string("S1A1E4"), torch.randn(2, 8), progress=False)
    with pytest.raises(Exception, match="do not divide"):
        carve(model, CarveConfig.from_string("S1A1E5"), random_windows(), progress=False)
    assert not any(isinstance(m, CarvedMoE) for m in model.modules())  # nothing was changed


def test_carve_is_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    carve(a, CarveConfig.from_string("S1A1E4"), random_windows(), progress=False)
    carve(b, CarveConfig.from_string("S1A1E4"), random_windows(), progress=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_carve_runs(dtype):
    model = tiny_model("llama").to(dtype)
    carve(model, CarveConfig.from_string("S1A1E4"), random_windows(), progress=False)
    out = model(random_windows(1, 16)).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_per_layer_budgets_carve_save_load_and_run_through_the_kernels(tmp_path):
    """layer_active gives each layer its own A (its module's top_k); the folder reloads through
    moecarve.load and trust_remote_code with the same logits, the C kernels agree, and the report's
    active fractions and bytes follow the budgets."""
    import moecarve
    from moecarve.modules.fast import use_kernels
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    n_layers = len(decoder_layers(model))
    budgets = [8 + 24 * (i % 2) for i in range(n_layers)]  # 8, 32, 8, ... of 128 single neurons
    cfg = CarveConfig.from_string("S0A20E128", layer_active=budgets, selection="topk")  # top_k = A
    report = carve(model, cfg, random_windows(4, 64), progress=False)
    tops = [m.spec.top_k for m in model.modules() if isinstance(m, CarvedMoE)]
    assert tops == budgets and [r.n_active for r in report.layers] == budgets
    assert [r.active_fraction for r in report.layers] == [b / 128 for b in budgets]
    assert report.active_fraction == pytest.approx(sum(budgets) / (128 * n_layers))
    assert report.active_range == (8 / 128, 32 / 128)
    small, large = report.layers[0].bytes_per_token, report.layers[1].bytes_per_token
    dense = read_ffn(model.config, decoder_layers(tiny_model("llama"))[0])
    per_neuron = 3 * dense.hidden_size * 4  # gate, up and down rows of one neuron, float32 (no biases)
    assert large - small == 24 * per_neuron  # only the active experts' bytes differ between the layers
    assert report.layers[0].dense_bytes == sum(t.numel() for t in dense.tensors()) * 4 == 128 * per_neuron
    ids = random_windows(1, 12, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        use_kernels(model, "cpu")  # the C kernels: each layer picks its own A
        torch.testing.assert_close(model(ids[:, :1]).logits, expected[:, :1], atol=1e-4, rtol=1e-4)
        use_kernels(model, "torch")
    out = moecarve.save(model, tmp_path / "c", report=report)
    from moecarve.io.save import load_report

    assert load_report(out).config.layer_active == tuple(budgets)  # recorded, and read back as a tuple
    with torch.no_grad():
        assert torch.equal(moecarve.load(out, kernels="none")(ids).logits, expected)
        torch.testing.assert_close(moecarve.load(out)(ids).logits, expected, atol=1e-5, rtol=1e-5)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        torch.testing.assert_close(remote(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CarveError, match="layer_active lists 1 layers"):
        carve(tiny_model("llama"), CarveConfig.from_string("S0A20E128", layer_active=[8]), random_windows(), progress=False)


def test_cli_active_alone_is_single_neurons(tmp_path, reference_tokenizer, capsys):
    """moecarve carve --active F alone: single-neuron experts (the default expert size) at F."""
    from moecarve.cli import main

    model = tiny_model("llama", vocab_size=len(reference_tokenizer))
    model.save_pretrained(tmp_path / "dense")
    reference_tokenizer.save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("moecarve carves dense models into mixtures of experts. " * 400)
    argv = ["carve", str(tmp_path / "dense"), "--out", str(tmp_path / "c"), "--samples", "2", "--seqlen", "64",
            "--calib", str(text), "--active", "0.5"]  # fmt: skip
    assert main(argv) == 0
    assert "--expert-size 1 on intermediate size 128: S0A64E128" in capsys.readouterr().out
    both = ["carve", str(tmp_path / "dense"), "--out", str(tmp_path / "c2"), "--active", "0.5", "--config", "S1A1E4"]
    assert main(both) == 2 and not (tmp_path / "c2").exists()
    assert "pass either --config or --active" in capsys.readouterr().err
