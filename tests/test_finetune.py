"""Fine-tuning carved models: LoRA learns, merges exactly, saves/loads, resumes deterministically."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers

import moecarve
from moecarve.config import ConfigError
from moecarve.finetune import FinetuneConfig, FinetuneError, finetune, merge_lora
from moecarve.finetune.balance import LoadTracker
from moecarve.finetune.checkpoint import latest
from moecarve.finetune.lora import add_expert_lora, add_linear_lora, carved_layers
from moecarve.modules.moe import pack_nibbles, quantize_rows, requantize_shadows
from tests.conftest import random_windows, tiny_model


_CARVED: dict[str, torch.nn.Module] = {}


def carved_tiny(arch: str = "llama", spec: str = "S1A1E4") -> torch.nn.Module:
    """A fresh copy of a tiny carved model (carved once per arch, then deep-copied)."""
    if arch not in _CARVED:
        model = tiny_model(arch)
        moecarve.carve(model, moecarve.CarveConfig.from_string(spec), random_windows(4, 32), progress=False)
        _CARVED[arch] = model
    return copy.deepcopy(_CARVED[arch])


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, use_cache=False).logits


def test_config_validation():
    with pytest.raises(ConfigError, match="lora_r"):
        FinetuneConfig(lora_r=0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        FinetuneConfig(lora_dropout=1.0)
    with pytest.raises(ConfigError, match="nothing to train"):
        FinetuneConfig(target_attention=False, target_experts=False, train_router_scale=False)
    assert FinetuneConfig.from_dict(FinetuneConfig(lr=1e-3).to_dict()) == FinetuneConfig(lr=1e-3)


def test_bad_windows_and_resume_without_checkpoint(tmp_path):
    model = carved_tiny()
    with pytest.raises(FinetuneError):
        finetune(model, FinetuneConfig(), torch.zeros(8, dtype=torch.long), progress=False)
    with pytest.raises(FinetuneError, match="no checkpoint"):
        finetune(carved_tiny(), FinetuneConfig(), random_windows(2, 16), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_adapters_start_as_identity_and_merge_exactly():
    """Fresh LoRA (B = 0) leaves the logits unchanged; after perturbing B, merging keeps them."""
    model, ids = carved_tiny("qwen2"), random_windows(2, 16, seed=3)
    ref = logits(model, ids)
    add_linear_lora(model, 4, 8.0, 0.0)
    add_expert_lora(model, 4, 2.0)
    torch.testing.assert_close(logits(model, ids), ref)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith(".B"):
                p.normal_(0, 0.05)
    requantize_shadows(model)  # the shadow routers score the adapted experts, as merge_lora makes them
    adapted = logits(model, ids)
    assert (adapted - ref).abs().max() > 1e-3  # the adapters do act, on attention and experts
    merge_lora(model)
    assert not any("lora" in n or "parametrizations" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_bias_update_moves_against_load():
    model = carved_tiny()
    tracker = LoadTracker(model)
    path = next(iter(tracker.counts))
    tracker.counts[path].copy_(torch.tensor([10.0, 2.0, 3.0]))  # mean 5: expert 0 overloaded
    tracker.update_bias(0.01)
    bias = carved_layers(model)[path].router.bias
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01]))
    tracker.remove()


def test_loss_goes_down_and_routing_is_observed():
    model = carved_tiny()
    train = random_windows(8, 32, seed=1)
    cfg = FinetuneConfig(epochs=4, batch_size=4, lr=1e-2, router_lr=1e-2, lora_dropout=0.0, bias_gamma=1e-3)
    report = finetune(model, cfg, train, eval_windows=train, progress=False)
    assert report.steps == 8 and len(report.losses) == 8
    assert report.ppl_after < 0.9 * report.ppl_before
    assert report.load_before[0] >= 1.0 and report.load_after[0] >= 1.0
    moes = carved_layers(model).values()
    assert all(m.router.bias.abs().sum() > 0 for m in moes)  # the balancing bias moved
    assert all(m.router.scale.abs().sum() > 0 for m in moes)  # the router scale was trained


def shadow_codes(model) -> list[torch.Tensor]:
    return [layer.router.codes.clone() for layer in carved_layers(model).values()]


def test_merged_save_load_same_logits(tmp_path):
    model, ids = carved_tiny("llama"), random_windows(2, 24, seed=5)
    cfg = FinetuneConfig(epochs=2, batch_size=2, lr=5e-3, lora_dropout=0.1)
    stale = shadow_codes(model)
    finetune(model, cfg, random_windows(4, 24, seed=2), merge=False, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(stale, shadow_codes(model)))  # training leaves the shadow as it was
    requantize_shadows(model)  # score the adapted experts (what merging does), to compare like with like
    unmerged = logits(model, ids)
    merge_lora(model)
    fresh = shadow_codes(model)
    # the shadow routers now score the merged experts: their codes are the merged rows, quantised
    for layer, codes in zip(carved_layers(model).values(), fresh):
        q, _ = quantize_rows(layer.experts.in_proj, layer.spec.shadow_bits)
        assert torch.equal(codes, pack_nibbles(q))
    assert any(not torch.equal(a, b) for a, b in zip(stale, fresh))  # the fine-tune moved some rows across a step
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)  # the merge itself is exact
    moecarve.save(model, tmp_path / "ft")
    loaded = moecarve.load(tmp_path / "ft", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, ids), unmerged, atol=1e-5, rtol=1e-5)
    for (_, a), (_, b) in zip(carved_layers(model).items(), carved_layers(loaded).items()):
        torch.testing.assert_close(a.router.bias, b.router.bias)  # the balancing bias is saved too


def test_resume_continues_from_saved_step(tmp_path):
    """An interrupted run resumed from its checkpoint ends exactly where an uninterrupted one does."""
    train = random_windows(6, 16, seed=4)
    cfg = FinetuneConfig(epochs=2, batch_size=2, lr=5e-3, lora_dropout=0.1, checkpoint_every=2)
    full = carved_tiny()
    done = finetune(full, cfg, train, checkpoint_dir=tmp_path / "a", progress=False)
    assert done.steps == 6 and latest(tmp_path / "a").name == "step-000006"

    part = carved_tiny()
    first = finetune(part, replace(cfg, max_steps=3), train, checkpoint_dir=tmp_path / "b", progress=False)
    assert first.steps == 3 and latest(tmp_path / "b").name == "step-000003"
    resumed_model = carved_tiny()  # a fresh process: same carved starting point, new adapters
    torch.manual_seed(123)  # a different RNG state must not matter: the checkpoint restores it
    resumed = finetune(resumed_model, cfg, train, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.steps == 6 and len(resumed.losses) == 3
    torch.testing.assert_close(resumed.losses, done.losses[3:])
    full_sd, res_sd = full.state_dict(), resumed_model.state_dict()
    for k in full_sd:
        torch.testing.assert_close(res_sd[k], full_sd[k], atol=1e-6, rtol=1e-6)
    with pytest.raises(FinetuneError, match="lr was"):  # resuming under other hyper-parameters fails
        finetune(carved_tiny(), replace(cfg, lr=1e-3), train, checkpoint_dir=tmp_path / "b", resume=True, progress=False)


def test_a_time_budget_stops_training_and_saves_a_checkpoint_to_resume(tmp_path, monkeypatch):
    """max_minutes ends the loop once the wall time is spent (here after two steps, on a fake
    clock), saves where it stopped, and a resumed run continues to the end as if never stopped."""
    import importlib

    train_mod = importlib.import_module("moecarve.finetune.train")

    train = random_windows(8, 16, seed=9)
    cfg = FinetuneConfig(batch_size=2, lr=5e-3, lora_dropout=0.0, seed=3)
    clock = iter(range(0, 10_000, 30))  # every call to the clock: 30 s later
    monkeypatch.setattr(train_mod, "_clock", lambda: float(next(clock)))
    part = finetune(carved_tiny(), replace(cfg, max_minutes=1.2), train, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert part.steps == 2 and len(part.losses) == 2 and latest(tmp_path).name == "step-000002"
    full = finetune(carved_tiny(), cfg, train, progress=False)
    resumed = finetune(carved_tiny(), cfg, train, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.steps == full.steps == 4
    torch.testing.assert_close(part.losses + resumed.losses, full.losses)
    with pytest.raises(ConfigError, match="max_minutes"):
        FinetuneConfig(max_minutes=0)


def test_gradient_checkpointing_gives_the_same_training():
    train = random_windows(4, 16, seed=8)
    cfg = FinetuneConfig(batch_size=2, lr=5e-3, lora_dropout=0.1)
    calls = {}

    def run(checkpointing: bool):
        model = carved_tiny()
        calls[checkpointing] = 0
        moe = next(iter(carved_layers(model).values()))
        # a pre-hook: the recompute stops early, once the last saved tensor is rebuilt
        moe.register_forward_pre_hook(lambda *a: calls.__setitem__(checkpointing, calls[checkpointing] + 1))
        return finetune(model, replace(cfg, gradient_checkpointing=checkpointing), train, progress=False)

    plain, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt.losses, plain.losses)
    assert calls[True] > calls[False]  # the layers were really recomputed in backward


def test_dense_model_finetunes_its_linear_layers():
    model = tiny_model("gpt2")
    ids = random_windows(2, 16, seed=6)
    before = logits(model, ids)
    finetune(model, FinetuneConfig(lr=1e-2, lora_dropout=0.0), random_windows(4, 16, seed=7), progress=False)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (logits(model, ids) - before).abs().max() > 1e-4


def test_cli_finetune_and_resume(tmp_path, reference_tokenizer):
    """The CLI on a tiny carved model with the reference tokenizer: --max-steps stops with a
    checkpoint, --resume finishes, the output is an ordinary carved folder with a finetune report."""
    import json

    from moecarve.cli import main
    from tests.conftest import CALIB_TXT, TINY

    data = tmp_path / "train.txt"  # a slice: tokenizing all of calib.txt would dominate the test
    data.write_text(CALIB_TXT.read_text()[:20_000])
    torch.manual_seed(0)
    vocab = len(reference_tokenizer)
    config = TINY["llama"]()
    config.vocab_size = vocab  # the tiny llama, with the reference tokenizer's vocabulary
    model = transformers.AutoModelForCausalLM.from_config(config)
    moecarve.carve(model, moecarve.CarveConfig.from_string("S2A2E8"), random_windows(2, 32, vocab=vocab), progress=False)
    moecarve.save(model, tmp_path / "carved", tokenizer=reference_tokenizer)
    args = ["finetune", str(tmp_path / "carved"), "--data", str(data), "--samples", "4", "--seqlen", "32",
            "--heldout", "2", "--batch-size", "2", "--out", str(tmp_path / "ft"), "--device", "cpu"]  # fmt: skip
    assert main(args + ["--max-steps", "1"]) == 0
    assert (tmp_path / "ft.ckpt" / "step-000001").is_dir()
    assert main(args + ["--overwrite", "--resume"]) == 0
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert report["start_step"] == 1 and report["steps"] == 2
    loaded = moecarve.load(tmp_path / "ft")
    assert loaded.config.moecarve["carve"]["n_active"] == 2
    assert main(args + ["--lora-r", "0", "--overwrite"]) == 2  # a bad config: one line, exit 2


# -- PEFT: LoRA on the stacked experts, adapters saved alone ---------------------------------------


def carved_e8() -> torch.nn.Module:
    """A tiny llama carved at S1A2E8: experts' in_proj [7, 32, 64] (2m != d, so a transposed layout would show)."""
    model = tiny_model("llama")
    moecarve.carve(model, moecarve.CarveConfig.from_string("S1A2E8"), random_windows(4, 32), progress=False)
    return model


def test_peft_lora_config_reaches_the_stacked_experts():
    """PEFT's own LoRA (target_parameters) on in_proj/out_proj of every carved layer: it trains, and
    merge_and_unload gives the unmerged model's logits."""
    from peft import get_peft_model
    from peft.tuners.lora import ParamWrapper

    from moecarve.finetune import lora_config
    from moecarve.finetune.lora import expert_parameters

    model, ids = carved_e8(), random_windows(2, 16, seed=3)
    base = logits(model, ids)
    cfg = lora_config(model, r=4, alpha=8)
    assert sorted(cfg.target_parameters) == sorted(expert_parameters(model)) and len(cfg.target_parameters) == 8
    peft_model = get_peft_model(model, cfg)
    wrapped = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert {m.parameter_name for m in wrapped} == {"in_proj", "out_proj"} and len(wrapped) == 8
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in wrapped)  # the expert factors learned
    unmerged = logits(peft_model, ids)
    assert (unmerged - base).abs().max() > 1e-4
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_saved_alone_applies_to_the_carved_folder(tmp_path):
    """finetune(merge=False) -> save_adapter (PEFT files + router state) -> load_adapter on the carved
    folder gives the fine-tuned model; PEFT alone applies the LoRA factors."""
    import json

    from peft import PeftModel

    from moecarve.finetune import load_adapter, save_adapter
    from moecarve.finetune.adapter import ROUTER_FILE

    model, ids = carved_e8(), random_windows(2, 24, seed=5)
    moecarve.save(model, tmp_path / "carved")
    cfg = FinetuneConfig(epochs=2, batch_size=2, lr=5e-3, lora_r=4, lora_alpha=8.0, lora_dropout=0.1)
    finetune(model, cfg, random_windows(4, 24, seed=2), merge=False, progress=False)
    requantize_shadows(model)  # the shadow routers score the adapted experts, as they will once merged
    unmerged = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tmp_path / "carved"))
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", ROUTER_FILE} <= names
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8.0 and adapter_cfg["lora_dropout"] == 0.0
    assert len(adapter_cfg["target_parameters"]) == 8 and len(adapter_cfg["target_modules"]) == 8  # q/k/v/o x 2 layers
    assert adapter_cfg["base_model_name_or_path"] == str(tmp_path / "carved")
    merge_lora(model)
    merged = logits(model, ids)
    applied = load_adapter(tmp_path / "carved", tmp_path / "adapter")
    torch.testing.assert_close(logits(applied, ids), merged, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(applied, ids), unmerged, atol=1e-5, rtol=1e-5)
    # PEFT alone applies the LoRA factors; the routers' trained scale and bias and the fresh
    # shadow codes (and their bias) need load_adapter (or requantize_shadows)
    plain = PeftModel.from_pretrained(moecarve.load(tmp_path / "carved"), str(tmp_path / "adapter"))
    moes_plain, moes_ft = carved_layers(plain).values(), carved_layers(model).values()
    for a, b in zip(moes_plain, moes_ft):
        with torch.no_grad():
            for name in ("scale", "bias", "codes", "row_scale", "in_bias"):
                getattr(a.router, name).copy_(getattr(b.router, name))
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_save_adapter_needs_unmerged_adapters(tmp_path):
    from moecarve.finetune import AdapterError, save_adapter

    model = carved_tiny()
    finetune(model, FinetuneConfig(max_steps=1, lora_dropout=0.0), random_windows(2, 16), progress=False)  # merged
    with pytest.raises(AdapterError, match="merge=False"):
        save_adapter(model, tmp_path / "a", FinetuneConfig())
    assert not (tmp_path / "a").exists()


def test_single_neuron_experts_get_one_lora_per_weight_and_round_trip(tmp_path):
    """Experts smaller than the rank (single neurons) share one low-rank delta per weight (FlatLoRA):
    its per-expert factors reproduce it, it merges exactly and saves as a PEFT adapter that
    load_adapter applies to the carved folder."""
    from moecarve.finetune import load_adapter, save_adapter
    from moecarve.finetune.lora import FlatLoRA, expert_lora

    g = torch.Generator().manual_seed(0)
    for out_proj, shape in ((False, (6, 2, 5)), (True, (6, 5, 1))):
        lora = expert_lora(torch.Size(shape), 3, 2.0, out_proj=out_proj, generator=g)
        assert isinstance(lora, FlatLoRA)
        with torch.no_grad():
            lora.B.normal_(generator=g)
        A, B = lora.expert_factors()
        assert A.shape == (6, 3, shape[2]) and B.shape == (6, shape[1], 3)
        torch.testing.assert_close(lora.delta(), 2.0 * torch.bmm(B, A))
        dense = lora.delta().permute(1, 0, 2).reshape(shape[1], -1) if out_proj else lora.delta().reshape(-1, shape[2])
        assert torch.linalg.matrix_rank(dense) <= 3  # one rank-3 delta over all experts, not one per expert

    model = tiny_model("llama")
    moecarve.carve(model, moecarve.CarveConfig.from_string("S0A32E128"), random_windows(4, 32), progress=False)
    ids = random_windows(2, 16, seed=3)
    moecarve.save(model, tmp_path / "carved")
    cfg = FinetuneConfig(epochs=2, batch_size=2, lr=5e-3, lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    finetune(model, cfg, random_windows(4, 24, seed=2), merge=False, progress=False)
    flat = [p for m in model.modules() if hasattr(m, "parametrizations") for ps in m.parametrizations.values() for p in ps]
    assert flat and all(isinstance(p, FlatLoRA) for p in flat)
    requantize_shadows(model)
    unmerged = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tmp_path / "carved"))
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    applied = load_adapter(tmp_path / "carved", tmp_path / "adapter")
    torch.testing.assert_close(logits(applied, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_shadow_routed_models_keep_their_bias_unless_asked():
    """Shadow routers' scores are the experts' |h| mass: by default the fine-tune leaves their bias at
    0; an explicit bias_gamma still balances them."""
    for gamma, moved in ((None, False), (1e-2, True)):
        model = carved_tiny("llama")  # the default method: shadow routers
        assert all(m.spec.router == "shadow" for m in carved_layers(model).values())
        cfg = FinetuneConfig(epochs=1, batch_size=2, lr=1e-3, lora_dropout=0.0, bias_gamma=gamma)
        finetune(model, cfg, random_windows(4, 24, seed=2), progress=False)
        biases = torch.cat([m.router.bias for m in carved_layers(model).values()])
        assert bool(biases.abs().gt(0).any()) == moved
