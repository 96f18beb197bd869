"""Condense (CD-MoE): exactness of the condensed layer, greedy search, memory, save/load (moecarve's and
the source architecture's format), MoE families without shared experts, fine-tuning, CLI, errors."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import moecarve
from moecarve.calibration import tokenize_windows
from moecarve.cli import main
from moecarve.condense import (CondenseConfig, CondenseError, UnsupportedMoE, apply, condense, finetune_condensed,
                               native_format_reason, plan, save_condensed)  # fmt: skip
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
    "olmoe": lambda: transformers.OlmoeConfig(**{**_C, "intermediate_size": 32}, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_C, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                     norm_topk_prob=True),
}  # fmt: skip
NO_SHARED = ["mixtral", "olmoe", "qwen3_moe"]


def tiny_moe(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random MoE causal LM; expert/router weights widened so routing and experts matter."""
    torch.manual_seed(seed)
    config = TINY_MOE[name]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config).float().eval()
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


@pytest.mark.parametrize("name", NO_SHARED)
def test_no_shared_experts_need_r_at_least_one(tmp_path, name):
    """Mixtral / OLMoE / Qwen3-MoE: R = 0 would leave an empty layer; R >= 1 condenses and reloads exactly."""
    model = tiny_moe(name)
    with pytest.raises(CondenseError, match=r"no shared experts: condensing it needs R >= 1"):
        condense(model, CondenseConfig(n_layers=1, n_experts=0), random_windows(1, 8), progress=False)
    assert len(moe_layers(model)) == 3  # the failed request changed nothing
    report = condense(model, CondenseConfig(n_layers=2, n_experts=2), random_windows(2, 16), progress=False)
    assert all(len(s.experts) == 2 and len(s.js_layer) == 3 for s in report.steps)
    assert_reloads_identically(model, report, tmp_path / "c", random_windows(2, 16, seed=3))


# -- the save format: the source architecture where its config can express the condensed layers ----


def _plain_reload_identical(model, report, path):
    """save_condensed writes a plain transformers folder that reloads (no moecarve, no remote code)
    to the same logits."""
    ids = random_windows(2, 16, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    save_condensed(model, path, report)
    assert not (path / "modeling_moecarve.py").exists() and (path / "condense_report.json").exists()
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and f"A {report.format} model with MoE layers condensed" in card
    assert f"Condensed (CD-MoE) on 2 × 16 calibration tokens: layers {report.layers}" in card
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert not getattr(again.config, "moecarve", None)
    with torch.no_grad():
        for prm in again.parameters():
            prm.data = prm.data.clone()
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)
    return again


def _condensed_logits(model, p, ids):
    """Logits with the plan's CondensedMLP candidates installed (on a copy)."""
    m = copy.deepcopy(model)
    for i in p.order:
        m.set_submodule(*p.candidates[i])
    with torch.no_grad():
        return m(ids).logits


def test_qwen3_moe_saves_natively_when_widths_match(tmp_path):
    """R * moe_intermediate_size == intermediate_size: the condensed layers become Qwen3MoeMLP layers
    listed in mlp_only_layers, and the folder is a plain Qwen3-MoE model."""
    model = tiny_moe("qwen3_moe", intermediate_size=64)
    calib, ids = random_windows(2, 16), random_windows(2, 16, seed=5)
    p = plan(model, CondenseConfig(n_layers=2, n_experts=2), calib, progress=False)
    expected = _condensed_logits(model, p, ids)
    report = apply(model, p)
    assert report.format == "qwen3_moe" and "mlp_only_layers" in report.format_reason
    assert model.config.mlp_only_layers == sorted(report.layers)
    with torch.no_grad():  # the native MLP computes what the CondensedMLP did
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    again = _plain_reload_identical(model, report, tmp_path / "c")
    assert sum(type(m).__name__ == "Qwen3MoeMLP" for m in again.modules()) == 2


def test_deepseek_saves_natively_only_right_after_the_dense_prefix(tmp_path):
    """DeepSeek: condensing the layers right after the first_k_dense_replace dense ones, at the
    dense width (1 shared + R = 1 routed expert of 32 = 64), extends first_k_dense_replace; a layer
    beyond the prefix alone cannot be expressed."""
    model = tiny_moe("deepseek_v2", intermediate_size=64)  # layer 0 dense, 1 and 2 MoE
    p = plan(model, CondenseConfig(n_layers=2, n_experts=1), random_windows(2, 16), progress=False)
    assert native_format_reason(model, p, [1, 2]) is None and native_format_reason(model, p, [1]) is None
    assert "not layers 1..1" in native_format_reason(model, p, [2])
    alone = copy.deepcopy(model)
    report = apply(alone, dataclasses.replace(p, order=[2, 1]), 1)  # layer 2 only
    assert report.format == "moecarve" and "first_k_dense_replace" in report.format_reason
    assert alone.config.first_k_dense_replace == 1
    report = apply(model, p)
    assert sorted(report.layers) == [1, 2] and report.format == "deepseek_v2"
    assert model.config.first_k_dense_replace == 3
    _plain_reload_identical(model, report, tmp_path / "c")


@pytest.mark.parametrize(
    "name, overrides, reason",
    [("qwen2_moe", {}, "no shared-expert gate"),  # Qwen2-MoE's sigmoid gate has no dense counterpart
     ("qwen3_moe", {}, "has 32 neurons but Qwen3-MoE's dense layers have intermediate_size = 96"),
     ("deepseek_v3", {}, "has 64 neurons but DeepSeek-V3's dense layers have intermediate_size = 96"),
     ("mixtral", {}, "Mixtral configs cannot make a layer dense"),
     ("olmoe", {}, "OLMoE configs cannot make a layer dense")],
)  # fmt: skip
def test_moecarve_format_when_not_expressible(tmp_path, name, overrides, reason):
    model = tiny_moe(name, **overrides)
    report = condense(model, CondenseConfig(n_layers=1, n_experts=1), random_windows(2, 16), progress=False)
    assert report.format == "moecarve" and reason in report.format_reason
    assert report.format_reason.startswith(f"not expressible in {model.config.model_type}: ")
    assert "\n" not in report.format_reason
    save_condensed(model, tmp_path / "c", report)
    assert (tmp_path / "c" / "modeling_moecarve.py").exists()
    # its own architecture: plain transformers refuses it instead of loading random dense layers
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["model_type"] == f"moecarve_{name}" and saved["architectures"][0].startswith("MoeCarve")
    assert "Condensed (CD-MoE)" in (tmp_path / "c" / "README.md").read_text()


# -- step 5: fine-tuning the condensed layers only --------------------------------------------------


def _tune_setup(kind: str):
    """(model, windows, config) for a fine-tune test: a tiny carved model (moecarve modules) or a tiny
    Qwen3-MoE whose condensed layers are native Qwen3MoeMLP."""
    if kind == "carved":
        return tiny_carved("S1A3E4"), random_windows(4, 32, seed=7), CondenseConfig(n_layers=1, n_experts=1)
    model = tiny_moe("qwen3_moe", intermediate_size=64)
    return model, random_windows(4, 32, seed=7), CondenseConfig(n_layers=2, n_experts=2)


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("kind", ["carved", "qwen3_moe"])
def test_finetune_trains_only_condensed_layers(kind, lora_r):
    model, windows, cfg = _tune_setup(kind)
    cfg = CondenseConfig(**{**cfg.to_dict(), "finetune_steps": 12, "finetune_lr": 1e-2, "finetune_batch_size": 2,
                            "finetune_lora_r": lora_r})  # fmt: skip
    report = apply(model, plan(model, cfg, windows[:2], progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ft = finetune_condensed(model, report, windows, progress=False)
    assert ft.steps == 12 == len(ft.losses) and ft.train_tokens == 12 * 2 * 32
    assert ft.loss_after < ft.loss_before - 0.05
    after = model.state_dict()
    assert after.keys() == before.keys()  # no LoRA parametrization left behind
    inside = [k for k in before if any(k.startswith(p + ".") for p in report.paths)]
    assert inside and all(not torch.equal(before[k], after[k]) for k in inside if k.endswith(("proj", "proj.weight")))
    assert all(torch.equal(before[k], after[k]) for k in before if k not in inside)  # bitwise unchanged
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    full = sum(p.numel() for path in report.paths for p in model.get_submodule(path).parameters())
    assert (ft.trainable_params == full) if lora_r == 0 else (0 < ft.trainable_params < full)


def test_finetune_is_deterministic_and_reloads(tmp_path):
    cfg = CondenseConfig(n_layers=1, n_experts=1, finetune_steps=6, finetune_lr=1e-2, finetune_batch_size=2, seed=3)
    runs = []
    for _ in range(2):
        model, windows, _ = _tune_setup("carved")
        report = condense(model, cfg, windows[:2], progress=False, finetune_windows=windows)
        runs.append((model, report))
    (m1, r1), (m2, r2) = runs
    assert r1.finetune.losses == r2.finetune.losses and r1.finetune.loss_after == r2.finetune.loss_after
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert_reloads_identically(m1, r1, tmp_path / "c", random_windows(2, 16, seed=9))


def test_finetune_on_carved_reference_lowers_calibration_loss(carved_reference):
    """Real weights: a few small steps on the calibration windows lower their loss."""
    model = copy.deepcopy(carved_reference["model"])
    report = apply(model, carved_reference["plans"][0])
    cfg = CondenseConfig(n_layers=2, finetune_steps=8, finetune_lr=1e-4, finetune_batch_size=2)
    ft = finetune_condensed(model, report, carved_reference["calib"], cfg, progress=False)
    assert report.finetune is ft and ft.steps == 8 and ft.lr == 1e-4
    assert ft.loss_after < ft.loss_before
    # the plan's candidates were copied in, not shared: the plan is unchanged for the other tests
    for i, (path, mod) in carved_reference["plans"][0].candidates.items():
        assert mod is not model.get_submodule(path)


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
        tail = sum(t.numel() * t.element_size() for t in list(mod.tail.parameters()) + list(mod.tail.buffers())) if mod.tail else 0
        removed += (mod.spec.n_routed - r) * per_expert + router + tail
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
            "--samples", "2", "--seqlen", "64", "--calib", str(calib), "--weighting", "expected",
            "--finetune-steps", "2", "--finetune-samples", "3", "--finetune-batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    out_text = capsys.readouterr().out
    assert "condense summary" in out_text and "2 steps (full" in out_text
    saved = json.loads((out / "condense_report.json").read_text())
    assert saved["format"] == "moecarve" and saved["finetune"]["steps"] == 2 and saved["finetune"]["train_windows"] == 3
    assert "in moecarve's format: not expressible in llama: the model already holds moecarve modules" in " ".join(out_text.split())
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
    with pytest.raises(CondenseError, match="finetune_steps must be >= 0"):
        CondenseConfig(finetune_steps=-1)
    with pytest.raises(CondenseError, match="finetune_lr must be > 0"):
        CondenseConfig(finetune_lr=0.0)
    with pytest.raises(CondenseError, match="finetune_batch_size"):
        CondenseConfig(finetune_batch_size=0)
    with pytest.raises(CondenseError, match="finetune_lora_r"):
        CondenseConfig(finetune_lora_r=-2)
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


def assert_reloads_identically(model, report, out, ids) -> None:
    """save_condensed -> moecarve.load gives bit-identical logits on ids."""
    with torch.no_grad():
        ref = model(ids).logits
    save_condensed(model, out, report)
    again = moecarve.load(out, dtype=torch.float32)
    with torch.no_grad():
        for prm in again.parameters():
            prm.data = prm.data.clone()
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)
