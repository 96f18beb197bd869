"""Condense (CD-MoE): exactness of the condensed layer, greedy search, memory, save/load, CLI, errors."""

import copy
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import moecarve
from moecarve.calibration import tokenize_windows
from moecarve.cli import main
from moecarve.condense import CondenseConfig, CondenseError, UnsupportedMoE, apply, condense, plan
from moecarve.condense.divergence import js_divergence
from moecarve.condense.experts import build_condensed, mean_routing_weights
from moecarve.condense.families import family_of, moe_layers
from moecarve.modules.moe import CarvedMoE

from tests.conftest import CALIB_TXT, REFERENCE_LM, random_windows, tiny_model

_C = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, intermediate_size=96)  # fmt: skip
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
TINY_MOE = {
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_C, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                     num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(**_C, **_MLA, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                                         num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=1.5),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**_C, **_MLA, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                                         num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1),
    "mixtral": lambda: transformers.MixtralConfig(**{**_C, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip


def tiny_moe(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random MoE causal LM; expert/router weights widened so routing and experts matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_MOE[name]()).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mlp" in n:
                p.normal_(0, 0.2)
    return model


def tiny_carved(config: str = "S1A3E4") -> torch.nn.Module:
    model = tiny_model("llama")
    moecarve.carve(model, moecarve.CarveConfig.from_string(config), random_windows(2, 32), device="cpu", progress=False)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The searches run many small matmuls: one thread avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def carved_reference(tmp_path_factory):
    """The reference model carved at S2A2E16 on 2 x 64 calibration tokens, saved with its tokenizer,
    and its condense plans for L = 2, R = 0 and R = 2."""
    if not REFERENCE_LM.exists():
        pytest.skip("needs ../shared/reference-lm")
    tok = transformers.AutoTokenizer.from_pretrained(REFERENCE_LM)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=torch.float32).eval()
    text = CALIB_TXT.read_text()[:50_000]
    calib = tokenize_windows(tok, text, 2, 64, seed=0)
    moecarve.carve(model, moecarve.CarveConfig.from_string("S2A2E16"), calib, device="cpu", progress=False)
    out = tmp_path_factory.mktemp("ref") / "carved"
    moecarve.save(model, out, tokenizer=tok)
    plans = {r: plan(model, CondenseConfig(n_layers=2, n_experts=r), calib, progress=False) for r in (0, 2)}
    return {"model": model, "dir": out, "calib": calib, "tok": tok, "plans": plans}


def final_hidden(model, ids):
    """The last decoder layer's output [N, L, d] (what the layer search compares)."""
    seen = []
    layers = model.model.layers
    h = layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for w in ids:
            model(input_ids=w.unsqueeze(0), use_cache=False)
    h.remove()
    return torch.cat(seen)


# -- the condensed layer ----------------------------------------------------------------------------


def test_js_divergence_properties():
    a, b = torch.randn(50, 16), torch.randn(50, 16)
    assert js_divergence(a, a) == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(a, b) == pytest.approx(js_divergence(b, a), rel=1e-5)
    assert 0 < js_divergence(a, b) <= math.log(2)
    assert js_divergence(a, a + 5.0) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a constant shift


def test_mean_routing_weights():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0]])
    w = torch.tensor([[0.5, 0.2], [0.3, 0.4], [0.9, 0.1]])
    got = mean_routing_weights(w, idx, n_experts=4)
    torch.testing.assert_close(got, torch.tensor([(0.5 + 0.3 + 0.1) / 3, (0.2 + 0.9) / 2, 0.4, 0.0]))
    expected = mean_routing_weights(w, idx, n_experts=4, weighting="expected")  # averaged over all 3 tokens
    torch.testing.assert_close(expected, torch.tensor([0.9 / 3, 1.1 / 3, 0.4 / 3, 0.0]))


def test_all_experts_kept_reproduces_carved_moe():
    """S1A3E4: every token selects all 3 routed experts with weight 1, so keeping all 3 is exact."""
    model = tiny_carved("S1A3E4")
    x = torch.randn(40, 64)
    for mod in [m for m in model.modules() if isinstance(m, CarvedMoE)]:
        fam = family_of(mod)
        view = fam.read(mod, model.config)
        w, idx = fam.route(mod, x)
        w_mean = mean_routing_weights(w, idx, view.n_routed)
        torch.testing.assert_close(w_mean, torch.ones(3))
        dense = build_condensed(view, [2, 0, 1], w_mean[[2, 0, 1]].tolist())
        torch.testing.assert_close(dense(x), mod(x), rtol=1e-5, atol=1e-5)
    ids = random_windows(2, 32, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    report = condense(model, CondenseConfig(n_layers=2, n_experts=3), random_windows(2, 32), progress=False)
    assert sorted(report.layers) == [0, 1]
    assert all(s.js_model < 1e-6 for s in report.steps)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY_MOE))
def test_router_weights_on_its_tokens_reproduce_moe(name):
    """Kept experts = the router's choice for a token, weights = its routing weights: exact on that token."""
    model = tiny_moe(name)
    x = torch.randn(12, 64)
    for path, mod in moe_layers(model).items():
        fam = family_of(mod)
        view = fam.read(mod, model.config)
        with torch.no_grad():
            y = mod(x.unsqueeze(0))[0]
            w, idx = fam.route(mod, x)
            for t in range(x.shape[0]):
                dense = build_condensed(view, idx[t].tolist(), w[t].tolist())
                torch.testing.assert_close(dense(x[t : t + 1]), y[t : t + 1], rtol=1e-4, atol=1e-5)
            # and a different expert set is NOT exact (the check above can fail)
            other = [e for e in range(view.n_routed) if e not in idx[0].tolist()][:2]
            assert not torch.allclose(build_condensed(view, other, w[0].tolist())(x[:1]), y[:1], atol=1e-3)


@pytest.mark.parametrize("name", sorted(TINY_MOE))
def test_tiny_moe_condense_save_load_identical(tmp_path, name):
    model = tiny_moe(name)
    n_moe = len(moe_layers(model))
    report = condense(model, CondenseConfig(n_layers=2, n_experts=1), random_windows(2, 16), progress=False)
    assert len(report.layers) == 2 == len(set(report.layers))
    left = sum(family_of(m) is not None for m in model.modules())
    assert left == n_moe - 2
    assert report.bytes_after < report.bytes_before
    ids = random_windows(2, 16, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    moecarve.save(model, tmp_path / "c")
    again = moecarve.load(tmp_path / "c", dtype=torch.float32)
    with torch.no_grad():
        for prm in again.parameters():  # see test_save_load_and_remote_code_identical_logits
            prm.data = prm.data.clone()
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)


# -- the search on a carved reference model (real weights) ------------------------------------------


def test_greedy_is_deterministic_and_cached_js_is_exact(carved_reference):
    model, calib = copy.deepcopy(carved_reference["model"]), carved_reference["calib"]
    p1 = carved_reference["plans"][2]
    p2 = plan(model, CondenseConfig(n_layers=2, n_experts=2), calib, progress=False)
    assert p1.order == p2.order and p1.js_model == p2.js_model
    assert all(p1.choices[i].experts == p2.choices[i].experts for i in p1.choices)
    assert all(len(set(c.experts)) == 2 for c in p1.choices.values())
    ref = final_hidden(model, calib)
    apply(model, p1)
    # the cached layer search reports the JS a plain full forward of the condensed model gives
    assert js_divergence(ref, final_hidden(model, calib)) == pytest.approx(p1.js_model[-1], rel=1e-3, abs=1e-6)


def test_first_greedy_layer_is_the_best_single_layer(carved_reference):
    model, calib, p = carved_reference["model"], carved_reference["calib"], carved_reference["plans"][0]
    ref = final_hidden(model, calib)
    js = {}
    for layer, (path, mod) in p.candidates.items():
        old = model.get_submodule(path)
        model.set_submodule(path, mod)
        js[layer] = js_divergence(ref, final_hidden(model, calib))
        model.set_submodule(path, old)
    assert p.order[0] == min(js, key=js.get)
    assert js[p.order[0]] == pytest.approx(p.js_model[0], rel=1e-3)


@pytest.mark.parametrize("r", [0, 2])
def test_memory_shrinks_by_removed_experts(carved_reference, r):
    model = copy.deepcopy(carved_reference["model"])
    moes = {p: m for p, m in model.named_modules() if isinstance(m, CarvedMoE)}
    report = apply(model, carved_reference["plans"][r])
    removed = 0
    for step in report.steps:
        mod = moes[step.path]
        per_expert = sum(t[0].numel() * t.element_size() for t in (mod.experts.in_proj, mod.experts.out_proj))
        router = sum(t.numel() * t.element_size() for t in list(mod.router.parameters()) + list(mod.router.buffers()))
        removed += (mod.spec.n_routed - r) * per_expert + router
    assert report.bytes_before - report.bytes_after == removed
    assert report.params_after < report.params_before
    assert all(len(s.experts) == r and len(s.js_layer) == r + 1 for s in report.steps)
    assert [s.js_model for s in report.steps] == carved_reference["plans"][r].js_model


def test_save_load_and_remote_code_identical_logits(carved_reference, tmp_path):
    model, calib = copy.deepcopy(carved_reference["model"]), carved_reference["calib"]
    apply(model, carved_reference["plans"][2])
    ids = calib[:1]
    with torch.no_grad():
        ref = model(ids).logits
    moecarve.save(model, tmp_path / "c")
    loaded = moecarve.load(tmp_path / "c", dtype=torch.float32)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "c", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # bit-identical once the weights sit in freshly allocated memory: safetensors' memory-mapped
        # tensors can be misaligned, which changes the CPU matmul kernel's summation order
        for m in (loaded, remote):
            for prm in m.parameters():
                prm.data = prm.data.clone()
            torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=0)


def test_cli_condense(carved_reference, tmp_path, capsys):
    out = tmp_path / "cd"
    calib = tmp_path / "calib.txt"  # a slice: tokenizing all 4 MB would dominate the test
    calib.write_text(CALIB_TXT.read_text()[:50_000])
    args = ["condense", str(carved_reference["dir"]), "--layers", "1", "--experts", "1", "--out", str(out),
            "--samples", "2", "--seqlen", "64", "--calib", str(calib), "--weighting", "expected"]  # fmt: skip
    assert main(args) == 0
    assert "condense summary" in capsys.readouterr().out
    assert (out / "condense_report.json").exists() and (out / "modeling_moecarve.py").exists()
    kinds = [e["type"] for e in moecarve.io.save.read_config(out).moecarve["modules"].values()]
    assert kinds.count("condensed") == 1 and kinds.count("moe") == 5
    bad = tmp_path / "bad"
    assert main([*args[:5], "99", "--out", str(bad), *args[8:]]) == 2  # R larger than the routed experts
    assert not bad.exists()


# -- errors ---------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(CondenseError):
        CondenseConfig(n_layers=0)
    with pytest.raises(CondenseError):
        CondenseConfig(n_experts=-1)
    with pytest.raises(CondenseError, match="weighting"):
        CondenseConfig(weighting="median")
    with pytest.raises(CondenseError, match="no shared experts"):
        plan(tiny_moe("mixtral"), CondenseConfig(n_layers=1, n_experts=0), random_windows(1, 8), progress=False)
    with pytest.raises(CondenseError, match="MoE layers"):
        plan(tiny_moe("qwen2_moe"), CondenseConfig(n_layers=3), random_windows(1, 8), progress=False)
    with pytest.raises(CondenseError, match="routed experts"):
        plan(tiny_moe("qwen2_moe"), CondenseConfig(n_layers=1, n_experts=5), random_windows(1, 8), progress=False)
    with pytest.raises(UnsupportedMoE):
        plan(tiny_model("llama"), CondenseConfig(), random_windows(1, 8), progress=False)
    with pytest.raises(CondenseError, match="LongTensor"):
        plan(tiny_moe("qwen2_moe"), CondenseConfig(), torch.zeros(1, 8), progress=False)
