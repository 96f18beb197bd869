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
    moe, rep = carve_ffn(ffn, torch.randn(300, d), CarveConfig.from_string("S2A2E8"))
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
    moe, _ = carve_ffn(ffn, torch.randn(200, d), CarveConfig.from_string("S1A1E4"))
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
