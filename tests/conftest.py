"""Shared fixtures: the reference model (real weights) and tiny random models of every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_LM = SHARED / "reference-lm"
CALIB_TXT = SHARED / "corpus" / "calib.txt"
TEST_TXT = SHARED / "corpus" / "test.txt"

torch.set_num_threads(2)

# tiny configs: hidden 64, intermediate 128 (divisible by 2, 4, 8, 16), 2 layers
_COMMON = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
TINY = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "llama_bias": lambda: transformers.LlamaConfig(**_COMMON, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda: transformers.Phi3Config(**_COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=128),
    "opt": lambda: transformers.OPTConfig(vocab_size=128, max_position_embeddings=128, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
}  # fmt: skip


def tiny_model(name: str, seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A tiny random causal LM of family `name` in float32, eval mode, with non-trivial biases."""
    torch.manual_seed(seed)
    config = TINY[name]()
    if vocab_size is not None:  # e.g. 8192 to pair the model with the reference tokenizer
        config.vocab_size = vocab_size
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random biases so that bias handling is actually exercised
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def random_windows(n: int = 2, seqlen: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def reference_tokenizer():
    if not REFERENCE_LM.exists():
        pytest.skip("../shared/reference-lm is not available")
    return transformers.AutoTokenizer.from_pretrained(REFERENCE_LM)


@pytest.fixture
def reference_model():
    if not REFERENCE_LM.exists():
        pytest.skip("../shared/reference-lm is not available")
    return transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=torch.float32).eval()
