"""generate() of carved models runs on the decode runtime however the folder is loaded, with the
same tokens as transformers' own generate (float32, tiny models where routing has no near ties),
and falls back to transformers' generate for what the runtime does not serve."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import moecarve
from moecarve import CarveConfig, carve

from .conftest import random_windows, tiny_model


@pytest.fixture(scope="module")
def carved_dir(tmp_path_factory, reference_tokenizer):
    model = tiny_model("llama", vocab_size=len(reference_tokenizer))
    carve(model, CarveConfig.from_string("S0A32E128"), random_windows(4, 32, vocab=len(reference_tokenizer)))
    out = tmp_path_factory.mktemp("hfgen") / "carved"
    moecarve.save(model, out, tokenizer=reference_tokenizer)
    return out


PROMPTS = [[5, 80, 311, 42, 7], [9, 1000, 25]]


def loaders(path):
    yield "moecarve.load", moecarve.load(path)
    yield "trust_remote_code", AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)


def test_generate_runs_on_the_runtime_with_the_reference_tokens(carved_dir):
    for how, model in loaders(carved_dir):
        ids = torch.tensor([PROMPTS[0]])
        fast = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert "_moecarve_runtime" in model.__dict__, how  # the runtime served it
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, use_runtime=False)
        assert torch.equal(fast, ref), how


def test_left_padded_batches_equal_each_row_alone(carved_dir):
    model = moecarve.load(carved_dir)
    a, b = PROMPTS
    ids = torch.tensor([a, [0] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, p in zip(out, PROMPTS):
        alone = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert row[len(a) :].tolist() == alone[0, len(p) :].tolist()


def test_sampling_follows_torch_manual_seed(carved_dir):
    model = moecarve.load(carved_dir)
    ids = torch.tensor([PROMPTS[0]])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20))
    assert torch.equal(runs[0], runs[1])


def test_calls_the_runtime_does_not_serve_fall_back(carved_dir):
    """Beam search goes to transformers' generate (with the fast kernels bound), with its own result."""
    model = moecarve.load(carved_dir)
    ids = torch.tensor([PROMPTS[0]])
    got = model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False)
    ref = model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False, use_runtime=False)
    assert torch.equal(got, ref)
    assert all(m.fast_forward is None for m in model.modules() if hasattr(m, "fast_forward"))  # unbound afterwards


def test_pipeline_and_streamer(carved_dir, reference_tokenizer):
    model = moecarve.load(carved_dir)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=reference_tokenizer)
    text = pipe("The file", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = reference_tokenizer("The file", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, use_runtime=False)
    assert text == reference_tokenizer.decode(ref[0], skip_special_tokens=True)

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == ids.tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, ids.shape[1] :].tolist()
