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
# a window shorter than the test sequences: sliding and full layers then see different masks
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
_GEMMA3_TEXT = dict(_COMMON, head_dim=16, query_pre_attn_scalar=16, **_SLIDING)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)  # fmt: skip
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
TINY = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "llama_bias": lambda: transformers.LlamaConfig(**_COMMON, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda: transformers.Phi3Config(**_COMMON),
    # today's families (issue 27): each differs from LLaMA outside the MLP
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_GEMMA3_TEXT),  # GeGLU, (1 + w) norms, local/global rope
    "gemma3": lambda: transformers.Gemma3Config(text_config=_GEMMA3_TEXT, vision_config=_VISION, mm_tokens_per_image=4),
    "vaultgemma": lambda: transformers.VaultGemmaConfig(**_COMMON, head_dim=16, query_pre_attn_scalar=16, **_SLIDING),
    "llama3": lambda: transformers.LlamaConfig(**_COMMON, rope_parameters=_LLAMA3_ROPE),
    "granite": lambda: transformers.GraniteConfig(**_COMMON, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                  attention_multiplier=0.0625, logits_scaling=8.0),
    "olmo": lambda: transformers.OlmoConfig(**_COMMON),
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON),  # norms after attention and MLP
    "olmo3": lambda: transformers.Olmo3Config(**_COMMON, **_SLIDING),
    "cohere": lambda: transformers.CohereConfig(**_COMMON),
    "cohere2": lambda: transformers.Cohere2Config(**_COMMON, **_SLIDING),
    "glm": lambda: transformers.GlmConfig(**_COMMON, head_dim=16),  # fused gate_up_proj
    "glm4": lambda: transformers.Glm4Config(**_COMMON, head_dim=16),
    "smollm3": lambda: transformers.SmolLM3Config(**_COMMON),
    "ministral": lambda: transformers.MinistralConfig(**_COMMON, head_dim=16, **_SLIDING),
    "ministral3": lambda: transformers.Ministral3Config(**_COMMON, head_dim=16),
    "exaone4": lambda: transformers.Exaone4Config(**_COMMON, **_SLIDING),
    "helium": lambda: transformers.HeliumConfig(**_COMMON, head_dim=16),
    "stablelm": lambda: transformers.StableLmConfig(**_COMMON),
    "seed_oss": lambda: transformers.SeedOssConfig(**_COMMON, head_dim=16),
    "hunyuan_v1_dense": lambda: transformers.HunYuanDenseV1Config(**_COMMON, head_dim=16),
    "ernie4_5": lambda: transformers.Ernie4_5Config(**_COMMON, head_dim=16),
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
