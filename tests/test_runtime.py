"""The decode runtime (moecarve/runtime) against the transformers forward it replaces.

Tolerances per precision, on logits of tiny random models (values ~0.5) and the reference model
(values ~10): fp32 computes the same sums in another order (1e-4); bf16 rounds weights and the
products' inputs to 8 bits of mantissa (a few percent of the logits' spread); int8 quantises
weights and activations in blocks of 32 (about twice bf16's error).
A carved layer picks its experts by a discontinuous rule (top-A of scores computed on the int8
token), so two computations of the same carve that differ by rounding can pick a different
neuron near the cut: carved models are compared exactly on tiny models and by agreement rates
on the real one.
"""

from __future__ import annotations

import pytest
import torch

from moecarve import CarveConfig, carve
from moecarve.runtime import Engine, Runtime, UnsupportedModel, generate
from moecarve.runtime.generate import RequestError, logits_of
from moecarve.runtime.pack import dequantize_blocks, pack_panels, pack_rows, quantize_blocks, unpack_rows
from moecarve.runtime.native import BF16, F32, I8
from moecarve.runtime.step import RuntimeError_

from .conftest import REFERENCE_LM, TINY, random_windows, tiny_model

TOL = {"fp32": 1e-4, "bf16": 0.08, "int8": 0.15}  # max |logit error| / max |logit|
PROMPT = [3, 17, 45, 9, 88, 120, 5, 64, 33, 71, 2, 99, 14, 6, 50, 101]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ packing (pure tensor functions)


def test_int8_blocks_round_trip_within_half_a_step():
    w = torch.randn(40, 96) * torch.logspace(-2, 1, 96)  # blocks of very different scales
    w[3, :32] = 0.0  # an all-zero block quantises to zero, not NaN
    codes, scales = quantize_blocks(w)
    back = dequantize_blocks(codes, scales)
    step = scales.float().repeat_interleave(32, dim=1)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float16
    assert ((back - w).abs() <= step / 2 + 1e-6 * w.abs()).all()
    assert (back[3, :32] == 0).all()
    assert int((codes.to(torch.int16) - 128).abs().max()) <= 127


def test_panel_layouts_hold_every_element_once():
    w = torch.arange(20 * 40, dtype=torch.float32).view(20, 40)  # pads to 32 x 64
    data, _ = pack_panels(w, F32)
    assert data.shape == (2, 64, 16)
    assert data[1, 5, 3].item() == w[16 + 3, 5].item() and data[1, 50, 3].item() == 0.0  # padding
    b, _ = pack_panels(w, BF16)
    assert b.shape == (2, 32, 16, 2)
    assert b.view(torch.bfloat16)[0, 7, 2, 1].float().item() == w[2, 15].bfloat16().float().item()
    q, s = pack_panels(w, I8)
    assert q.shape == (2, 16, 16, 4) and s.shape == (2, 2, 16)
    rows, none = pack_rows(w, I8)
    assert none is None and rows.shape == (20, 128)  # 64 codes + 2 float16 scales per row, padded to 64 bytes
    assert torch.allclose(unpack_rows(rows, 40), w, rtol=0.01, atol=0.01 * w.abs().max())


# ------------------------------------------------------------------ dense models of every family


@pytest.mark.parametrize("family", sorted(TINY))
def test_families_match_transformers(family):
    model = tiny_model(family)
    ref = hf_logits(model, PROMPT)
    for precision in ("fp32", "bf16", "int8"):
        rt = Runtime(model, precision, threads=2, max_ctx=64)
        got = logits_of(rt, PROMPT)
        assert rel_err(got, ref) < TOL[precision], (family, precision, rel_err(got, ref))


def test_sliding_window_layers_attend_to_their_window_only():
    """Mistral with a window shorter than the prompt: beyond it the runtime must drop old keys."""
    model = tiny_model("mistral")
    model.config.sliding_window = 5
    ids = PROMPT * 2
    ref = hf_logits(model, ids)
    got = logits_of(Runtime(model, "fp32", threads=1, max_ctx=64), ids)
    assert rel_err(got, ref) < TOL["fp32"]
    model.config.sliding_window = None  # the window changes the answer (the test is not vacuous)
    assert rel_err(got, hf_logits(model, ids)) > 1e-3


# ------------------------------------------------------------------ carved models


@pytest.mark.parametrize(
    "config,overrides",
    [("S0A32E128", {}), ("S2A2E8", {}), ("S1A1E8", {"method": "cmoe"}),
     ("S1A2E8", {"method": "cmoe", "router": "linear"}), ("S0A4E16", {"shadow_bits": 0, "probes_per_expert": 1}),
     ("S0A32E128", {"selection": "threshold"})],
)  # fmt: skip
def test_carved_layers_match_their_reference_forward(config, overrides):
    """Every router (shadow top-A and threshold, analytic, linear, probe) and shared experts."""
    model = tiny_model("llama")
    carve(model, CarveConfig.from_string(config, **overrides), random_windows(4, 32))
    ref = hf_logits(model, PROMPT)
    got = logits_of(Runtime(model, "fp32", threads=2, max_ctx=64), PROMPT)
    assert rel_err(got, ref) < TOL["fp32"]


def test_int8_picked_neurons_use_each_blocks_own_scale():
    """The picked neurons' int8 down columns are read in blocks of 32 with one scale each: with the
    output features 32-63 of every expert's down columns scaled 8x against 0-31, a block read with
    its neighbour's scale puts the logits ~0.6 off (rel_err, measured); done right they stay within
    0.2 (~0.1: the 8x FFN output magnifies every precision's rounding, bf16's as much)."""
    model = tiny_model("llama")
    carve(model, CarveConfig.from_string("S0A32E128"), random_windows(4, 32))
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "CarvedMoE":
                mod.experts.out_proj[:, 32:, :] *= 8.0
    clear_thresholds(model, PROMPT)
    ref = hf_logits(model, PROMPT)
    assert rel_err(logits_of(Runtime(model, "fp32", threads=2, max_ctx=64), PROMPT), ref) < TOL["fp32"]
    assert rel_err(logits_of(Runtime(model, "int8", threads=2, max_ctx=64), PROMPT), ref) < 0.2


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "gemma2", "phi3"])
def test_carved_families_match(family):
    model = tiny_model(family)
    carve(model, CarveConfig.from_string("S0A32E128"), random_windows(4, 32))
    ref = hf_logits(model, PROMPT)
    assert rel_err(logits_of(Runtime(model, "fp32", threads=1, max_ctx=64), PROMPT), ref) < TOL["fp32"]


# ------------------------------------------------------------------ steps, threads, batches


@pytest.fixture(scope="module")
def carved_tiny():
    model = tiny_model("llama")
    carve(model, CarveConfig.from_string("S0A32E128"), random_windows(4, 32))
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("chunk", [5, 64])  # prompt chunks of 5 (each token's neurons in turn) or 64 (each neuron's tokens)
def test_decode_steps_after_a_prefill_equal_the_full_forward(carved_tiny, precision, chunk):
    prompt = PROMPT * 2  # 32 tokens: a chunk of 64 takes the expert-major path
    rt = Runtime(carved_tiny, precision, threads=2, max_ctx=64, max_tokens=chunk, prefill="routed")
    full = logits_of(rt, prompt)
    rt.prefill(prompt[:7])
    for i in range(7, len(prompt)):
        assert torch.equal(rt.step([prompt[i]], [i], [0], [0])[0], full[i])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_results_do_not_depend_on_the_thread_count(carved_tiny, precision):
    outs = [logits_of(Runtime(carved_tiny, precision, threads=n, max_ctx=64), PROMPT) for n in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def every_expert(model):
    """A copy of a carved model whose routers pick every expert (what the runtime's dense path computes)."""
    import copy

    model = copy.deepcopy(model)
    for mod in model.modules():
        if type(mod).__name__ == "CarvedMoE":
            mod.router.top_k = mod.spec.n_routed
            if getattr(mod.router, "threshold", None) is not None:  # threshold selection: every score passes
                mod.router.threshold.fill_(float("-inf"))
    return model


@pytest.mark.parametrize("config", ["S0A32E128", "S2A2E8"])
def test_dense_prefill_computes_every_expert(config):
    """Prompt tokens run the carved layers with every expert as one dense MLP (shared neurons too)."""
    model = tiny_model("llama")
    carve(model, CarveConfig.from_string(config), random_windows(4, 32))
    rt = Runtime(model, "fp32", threads=2, max_ctx=64)
    got = logits_of(rt, PROMPT, routed=False)
    assert rel_err(got, hf_logits(every_expert(model), PROMPT)) < TOL["fp32"]
    assert rel_err(got, hf_logits(model, PROMPT)) > 1e-3  # and that is not the routed carve


def test_large_decode_batches_run_every_expert(carved_tiny):
    """From dense_batch sequences on, decode steps run every expert: each sequence then gets what it
    gets alone under that policy; below it, what it gets routed alone."""
    prompts = [PROMPT[: 4 + i] for i in range(4)]

    def batched(rt):
        engine = Engine(rt)
        reqs = [engine.submit(p, 6) for p in prompts]
        engine.run_until_idle()
        return [r.output for r in reqs]

    dense_alone = Runtime(carved_tiny, "fp32", threads=1, max_ctx=64, max_slots=4, dense_batch=1)
    routed_alone = Runtime(carved_tiny, "fp32", threads=1, max_ctx=64, max_slots=4)
    at_4 = Runtime(carved_tiny, "fp32", threads=1, max_ctx=64, max_slots=4, dense_batch=4)
    assert batched(at_4) == [list(generate(dense_alone, p, 6)) for p in prompts]
    assert batched(routed_alone) == [list(generate(routed_alone, p, 6)) for p in prompts]
    assert [list(generate(dense_alone, p, 6)) for p in prompts] != [list(generate(routed_alone, p, 6)) for p in prompts]


def test_batched_rows_equal_the_same_sequences_alone(carved_tiny):
    rt = Runtime(carved_tiny, "bf16", threads=2, max_ctx=64, max_slots=4, max_tokens=16)
    prompts = [PROMPT[: 4 + 3 * i] for i in range(4)]
    alone = [list(generate(rt, p, 10)) for p in prompts]
    engine = Engine(rt)
    reqs = [engine.submit(p, 10) for p in prompts[:2]]
    engine.step()  # the others join a running batch
    reqs += [engine.submit(p, 10) for p in prompts[2:]]
    engine.run_until_idle()
    assert [r.output for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs) and sorted(engine.free_slots) == [0, 1, 2, 3]


def test_a_cancelled_request_frees_its_slot(carved_tiny):
    rt = Runtime(carved_tiny, "fp32", threads=1, max_ctx=64, max_slots=1)
    engine = Engine(rt)
    first = engine.submit(PROMPT, 40)
    engine.step()
    first.cancel()
    second = engine.submit(PROMPT[:5], 3)
    engine.run_until_idle()
    assert first.finish_reason == "cancelled" and len(first.output) < 40
    assert second.output == list(generate(rt, PROMPT[:5], 3))


# ------------------------------------------------------------------ the reference model


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE_LM.exists():
        pytest.skip("../shared/reference-lm is not available")
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_ids(reference_tokenizer):
    text = "The configuration file is read when the server starts. To change the port, edit the line"
    return reference_tokenizer(text).input_ids


def test_reference_model_greedy_tokens_are_identical_in_float32(reference, reference_ids):
    ids = torch.tensor([reference_ids])
    with torch.no_grad():
        hf = reference.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(reference_ids) :]
    ours = list(generate(Runtime(reference, "fp32", threads=2, max_ctx=128), reference_ids, 32))
    assert ours == hf.tolist()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reference_model_logits_within_tolerance(reference, reference_ids, precision):
    ref = hf_logits(reference, reference_ids)
    got = logits_of(Runtime(reference, precision, threads=2, max_ctx=128), reference_ids)
    assert rel_err(got, ref) < TOL[precision]
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def clear_thresholds(model, ids: list[int], window: int = 16) -> None:
    """Move each threshold router's threshold (and each tail's) into the widest gap among the `window`
    scores on either side of it that the model meets on ids (layer by layer, in the forward's order):
    a score within float rounding of the threshold picks differently in the runtime and in torch, and
    that one flip moves every later position's logits through attention. Both sides then run the
    same model."""

    def into_gap(module, values):
        s = values.flatten().sort().values  # ascending
        at = int(torch.searchsorted(s, module.threshold.reshape(1)).item())  # values below: s[:at]
        lo, hi = max(at - window, 1), min(at + window, s.numel() - 1)
        gaps = s[lo : hi + 1] - s[lo - 1 : hi]  # gaps[i] = s[lo + i] - s[lo + i - 1]
        i = int(gaps.argmax())
        module.threshold.fill_(float(s[lo + i - 1] + s[lo + i]) / 2)

    def centre(module, args):
        if hasattr(module, "logits"):  # a router: its scores + bias [T, E]
            x = args[0].reshape(-1, args[0].shape[-1])
            into_gap(module, module.logits(x) + module.bias)
        else:  # a tail: the |estimates| of the neurons outside the picks (args: est [T, N], free [T, N])
            into_gap(module, args[0].abs()[args[1]])

    modules = [m for m in model.modules() if getattr(m, "threshold", None) is not None]
    handles = [r.register_forward_pre_hook(centre) for r in modules]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()


def test_a_routed_prompt_is_computed_the_same_every_time(reference, reference_ids):
    """Two threads, a routed prompt of >= 16 tokens (the expert-major path): the same logits on every
    call. When a phase's items cut an expert's run of slots in two, about one call in ten differed."""
    import copy

    model = copy.deepcopy(reference)
    carve(model, CarveConfig.from_granularity(1536, expert_size=1, active=0.25), random_windows(2, 64, vocab=8192))
    assert len(reference_ids) >= 16
    rt = Runtime(model, "bf16", threads=2, max_ctx=128, prefill="routed")
    first = logits_of(rt, reference_ids)
    for _ in range(40):
        assert torch.equal(logits_of(rt, reference_ids), first)


def test_carved_reference_model_agrees_with_its_reference_forward(reference, reference_ids):
    """Single-neuron experts at 25% active, Fisher-weighted scores, no tail: the teacher-forced
    next-token choices agree and the logits stay close at almost every position."""
    import copy

    model = copy.deepcopy(reference)
    cfg = CarveConfig.from_granularity(1536, expert_size=1, active=0.25, tail=0.0)
    carve(model, cfg, random_windows(2, 64, vocab=8192))
    clear_thresholds(model, reference_ids)
    ref = hf_logits(model, reference_ids)
    got = logits_of(Runtime(model, "fp32", threads=2, max_ctx=128, prefill="routed"), reference_ids)
    err = ((got - ref).abs().amax(-1) / ref.abs().amax(-1))
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert err.median() < 1e-3


def test_the_tail_runs_as_in_the_reference_forward(reference):
    """The default carve (with a tail): one token at a time at position 0, the runtime's logits equal
    the reference forward's for almost every token. (A tail's output is multiplied by the router's
    estimates, made from the int8-rounded token: where float rounding moves an element of the token
    across a rounding boundary the two differ by about 1e-3, so the check is on the median over
    tokens; without the tail, or with a wrong one, every token is off by about 1e-2.)"""
    import copy

    model = copy.deepcopy(reference)
    carve(model, CarveConfig.from_granularity(1536, expert_size=1, active=0.25), random_windows(2, 64, vocab=8192))
    tails = [m.tail for m in model.modules() if type(m).__name__ == "CarvedMoE"]
    assert tails and all(t is not None for t in tails)
    tokens = list(range(200, 224))
    ref = torch.cat([hf_logits(model, [t]) for t in tokens])
    rt = Runtime(model, "fp32", threads=2, max_ctx=8)
    got = torch.cat([rt.step([t], [0], [0], [0], 1).clone() for t in tokens])
    err = (got - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert err.median() < 1e-4
    for t in tails:  # the same model without its tails: far from the reference
        t.threshold.fill_(float("inf"))
    off = torch.cat([Runtime(model, "fp32", threads=2, max_ctx=8).step([t], [0], [0], [0], 1).clone() for t in tokens])
    assert ((off - ref).abs().amax(-1) / ref.abs().amax(-1)).median() > 1e-3


def test_a_wide_tail_is_scanned_whole():
    """A layer of 2560 neurons: each of the tail's 8 ranges (320 neurons) is scanned in blocks of 256
    (ffn.c, tail_item), so the runtime must still agree with the reference forward across the block edge."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=2560, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    carve(model, CarveConfig.from_granularity(2560, expert_size=1, active=0.25), random_windows(4, 64))
    tails = [m.tail for m in model.modules() if type(m).__name__ == "CarvedMoE"]
    assert tails and all(t is not None for t in tails)
    tokens = list(range(40, 72))
    ref = torch.cat([hf_logits(model, [t]) for t in tokens])
    got = torch.cat([Runtime(model, "fp32", threads=2, max_ctx=8).step([t], [0], [0], [0], 1).clone() for t in tokens])
    assert ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).median() < 1e-4
    for t in tails:  # without its tail the layer is measurably different: the tail was exercised
        t.threshold.fill_(float("inf"))
    off = torch.cat([Runtime(model, "fp32", threads=2, max_ctx=8).step([t], [0], [0], [0], 1).clone() for t in tokens])
    assert ((off - ref).abs().amax(-1) / ref.abs().amax(-1)).median() > 1e-3


# ------------------------------------------------------------------ refusals


def test_bad_settings_are_refused(carved_tiny):
    with pytest.raises(UnsupportedModel, match="unknown precision"):
        Runtime(carved_tiny, "fp8")
    with pytest.raises(RuntimeError_, match="threads must be at least 1"):
        Runtime(carved_tiny, "fp32", threads=0)
    with pytest.raises(UnsupportedModel, match="beyond this model"):
        Runtime(carved_tiny, "fp32", max_ctx=10_000)
    rt = Runtime(carved_tiny, "fp32", threads=1, max_ctx=16)
    with pytest.raises(RuntimeError_, match="longer than the context"):
        rt.prefill(list(range(3, 30)))
    with pytest.raises(RuntimeError_, match="outside the vocabulary"):
        rt.step([500], [0], [0], [0])
    with pytest.raises(RuntimeError_, match="beyond the context"):
        rt.step([5], [16], [0], [0])
    with pytest.raises(RuntimeError_, match="slot 1 does not exist"):
        rt.step([5], [0], [1], [0])
    with pytest.raises(RuntimeError_, match="a step takes 2 tokens"):  # positions for one token only
        rt.step([5, 6], [0], [0, 0], [0])
    with pytest.raises(RuntimeError_, match="output row"):
        rt.step([5], [0], [0], [1])
    engine = Engine(rt)
    with pytest.raises(RequestError, match="exceed the context"):
        engine.submit(PROMPT[:10], 8)
    with pytest.raises(RequestError, match="the context holds 16"):
        engine.submit(PROMPT, 1)
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], 8)


def test_a_family_the_runtime_does_not_know_is_refused_with_its_name():
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(UnsupportedModel, match="model_type 'mamba'"):
        Runtime(model, "fp32")
