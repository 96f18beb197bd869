"""The C kernels (moecarve/kernels/native.c) against the reference modules, and the shadow
router's packed storage.

Every kernel is checked against the pure-torch code it replaces: the shadow scores against
ShadowRouter.logits (the same integer dot products, so equal to float rounding), the selection
against torch.topk, whole layers against CarvedMoE's reference forward for every layer kind and
expert size (single neurons, sizes below and above the kernels' 16-wide switch), float32 and bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moecarve.kernels import native
from moecarve.kernels.cpu import moe_decode_cpu
from moecarve.modules.fast import moe_tensors
from moecarve.modules.moe import ShadowRouter, pack_nibbles, quantize_rows, quantize_tokens, unpack_nibbles

from .test_kernels import CASES, D, clear_tokens, random_moe, reference

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch paths run instead")

SHADOW_CASES = {
    "s1a1": dict(),
    "s2a2": dict(S=2, A=2, E=6),
    "plain_bias": dict(gated=False, act="gelu", in_bias=True, out_bias=True, A=2),
    "gelu_tanh_bias": dict(act="gelu_pytorch_tanh", in_bias=True, A=3),
    "single_neurons": dict(S=0, E=96, m=1, A=24),
    "small_odd": dict(S=1, E=20, m=3, A=5),
    "sixteen_plus": dict(S=1, E=8, m=17, A=2),
    "a_all": dict(S=1, A=7, E=7),
    "d160": dict(S=0, E=13, m=2, A=3, d=160),  # rows of 2.5 chunks of 64 bytes: the masked last chunk
}


def shadow_moe(bits: int = 4, threshold: float | None = None, **kw):
    """A random layer whose shadow router is a real `bits`-bit copy of its experts' input rows
    (4 bits: packed two per byte; more: int8), selecting top-A or above `threshold`."""
    from dataclasses import replace

    moe = random_moe(router="shadow", **kw)
    layout = "nibbles" if bits <= 4 else "int8"
    spec = replace(moe.spec, shadow_bits=bits, shadow_layout=layout, selection="topk" if threshold is None else "threshold")
    router = ShadowRouter(spec)
    with torch.no_grad():
        router.scale.copy_(moe.router.scale)
        router.bias.copy_(moe.router.bias)
        if moe.router.in_bias is not None:
            router.in_bias.copy_(moe.router.in_bias)
        if threshold is not None:
            router.threshold.fill_(threshold)
    router.requantize(moe.experts.in_proj.detach(), bits)
    moe.router, moe.spec = router, spec
    return moe.eval()


def test_nibbles_round_trip_and_storage():
    codes = torch.randint(-8, 8, (5, 6, 64), dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6, 32)
    assert torch.equal(unpack_nibbles(packed), codes)
    # 4-bit shadow storage is a quarter of the same rows in bf16 (plus one float scale per row)
    moe = shadow_moe(S=1, E=7, m=24)
    rows_bf16 = moe.experts.in_proj.numel() * 2
    assert moe.router.codes.numel() * moe.router.codes.element_size() * 4 == rows_bf16


def test_token_quantisation_is_round_half_even():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 63.5, -0.4]])
    q, s = quantize_tokens(x)
    assert s.item() == 1.0 and q.tolist() == [[127.0, 0.0, 2.0, -2.0, 64.0, -0.0]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", SHADOW_CASES)
def test_shadow_scores_match_reference(case: str, bits: int):
    moe = shadow_moe(bits, **SHADOW_CASES[case])
    r = moe.router
    for T in (1, 2, 9):
        x = torch.randn(T, moe.spec.hidden_size, generator=torch.Generator().manual_seed(T))
        got = native.shadow_scores(x, r.codes, r.row_scale, r.in_bias, moe.spec.n_routed, moe.spec.expert_size,
                                   moe.spec.gated, moe.spec.act)  # fmt: skip
        torch.testing.assert_close(got, r.logits(x), atol=1e-5, rtol=1e-5)


def test_shadow_reference_is_the_dequantised_rows_against_the_int8_token():
    """ShadowRouter.logits == sum_j |act(g~) u~| computed plainly from quantize_rows' codes."""
    moe = shadow_moe(S=0, E=4, m=8, A=1)
    x = torch.randn(3, D)
    codes, scale = quantize_rows(moe.experts.in_proj.detach(), 4)  # [E, 16, d], [E, 16]
    q, s = quantize_tokens(x)
    h = torch.einsum("td,erd->ter", q, codes.float()) * s[:, :, None] * scale  # [T, E, 2m]
    expected = (torch.nn.functional.silu(h[..., :8]) * h[..., 8:]).abs().sum(-1)
    torch.testing.assert_close(moe.router.logits(x), expected, atol=1e-5, rtol=1e-5)


def test_select_matches_topk_and_threshold():
    scores = torch.randn(7, 50, generator=torch.Generator().manual_seed(3))
    bias, scale = torch.randn(50) * 0.1, torch.randn(50) * 0.5
    w, idx = native.select_experts(scores, bias, scale, 9)
    ref = torch.topk(scores + bias, 9, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    expected = 1.0 + scores.softmax(-1).gather(1, idx) * scale[idx]
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
    # threshold: exactly the experts above it, at most A of them, the rest -1 with weight 0
    w, idx = native.select_experts(scores, bias, scale, 9, threshold=0.8)
    for t in range(7):
        above = ((scores[t] + bias) > 0.8).nonzero().flatten()
        got = idx[t][idx[t] >= 0]
        if above.numel() <= 9:
            assert sorted(got.tolist()) == above.tolist()
        else:
            assert got.numel() == 9 and set(got.tolist()) <= set(above.tolist())
        assert (w[t][idx[t] < 0] == 0).all()
    # ties go to the lower index
    w, idx = native.select_experts(torch.zeros(1, 6), torch.zeros(6), torch.zeros(6), 3)
    assert sorted(idx[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("case", SHADOW_CASES)
@pytest.mark.parametrize("T", [1, 3, 8, 64])
def test_shadow_layer_matches_reference(case: str, T: int):
    moe = shadow_moe(**SHADOW_CASES[case])
    x = torch.randn(T, moe.spec.hidden_size, generator=torch.Generator().manual_seed(T))
    t = moe_tensors(moe)
    torch.testing.assert_close(native.moe_layer_shadow(x, t), reference(moe, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe_decode_cpu(x, t), reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_threshold_selection_matches_reference(T: int):
    moe = shadow_moe(threshold=0.0, S=0, E=64, m=2, A=24)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        scores = moe.router.logits(x) + moe.router.bias
        moe.router.threshold.fill_(float(scores.quantile(0.8)))  # about 13 of the 64 above
        w, idx = moe.router(x)
    assert ((w != 0).sum(-1) < 24).all()  # fewer than the cap: the threshold decides
    torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe)), reference(moe, x), atol=1e-5, rtol=1e-5)


FINE_CASES = {
    "single_neurons": dict(S=0, E=64, m=1, A=16),
    "single_neurons_shared": dict(S=8, E=64, m=1, A=8, in_bias=True, out_bias=True),
    "m3": dict(S=1, E=20, m=3, A=5, gated=False, act="relu"),
    "m17": dict(S=1, E=8, m=17, A=3),
}


@pytest.mark.parametrize("case", list(CASES) + list(FINE_CASES))
@pytest.mark.parametrize("T", [1, 4, 13])
def test_native_layer_matches_reference(case: str, T: int):
    """moe_layer with the module's routing, every layer kind and expert size."""
    moe = random_moe(**{**CASES, **FINE_CASES}[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe), "native"), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_native_layer_bfloat16():
    for moe in (shadow_moe(A=2), random_moe(S=0, E=64, m=1, A=16), random_moe(A=2, in_bias=True, out_bias=True)):
        moe = moe.to(torch.bfloat16)
        x = clear_tokens(moe, 4)  # no near ties that bf16 rounding could break either way
        out = moe_decode_cpu(x, moe_tensors(moe), "native")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, reference(moe, x), atol=7e-2, rtol=2e-2)  # float32 accumulation vs bf16 rounding


def test_no_expert_slots_are_skipped():
    """idx -1 (the threshold's unused slots) contributes nothing."""
    moe = random_moe(S=1, A=2)
    x = torch.randn(2, D)
    t = moe_tensors(moe)
    idx = torch.tensor([[3, -1], [-1, -1]])
    w = torch.tensor([[1.0, 5.0], [7.0, 7.0]])
    expected = reference(moe, x) - moe.experts(x, *reversed(moe.router(x)))  # the shared part alone
    expected[0] += moe.experts(x[:1], torch.tensor([[3]]), torch.ones(1, 1))[0]
    torch.testing.assert_close(native.moe_layer(x, t, idx, w), expected, atol=1e-5, rtol=1e-5)


def test_torch_paths_without_a_compiler():
    """MOECARVE_NATIVE=0 (or no compiler): kernels unavailable, the CPU path still matches."""
    code = (
        "import torch, sys; sys.path.insert(0, '.');"
        "from moecarve.kernels import native; from moecarve.kernels.cpu import moe_decode_cpu;"
        "from moecarve.modules.fast import moe_tensors; from tests.test_kernels import random_moe, reference;"
        "assert not native.available();"
        "m = random_moe(router='shadow', A=2); x = torch.randn(3, 64);"
        "torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(m)), reference(m, x), atol=1e-5, rtol=1e-5);"
        "print('ok')"
    )
    env = {**os.environ, "MOECARVE_NATIVE": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_library_is_cached_per_source(tmp_path, monkeypatch):
    """A fresh cache folder builds the library once; the same source reuses it."""
    monkeypatch.setenv("MOECARVE_CACHE", str(tmp_path))
    first = native._build()
    built = list((tmp_path / "moecarve" / "kernels").glob("native-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._build()
    assert built[0].stat().st_mtime_ns == mtime and first is not None


def test_folders_from_before_the_packed_layout_still_load(tmp_path):
    """A folder written with int8 shadow codes (one per byte) and no shadow_layout / selection in
    its config loads through moecarve.load and trust_remote_code, with the same logits."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    import moecarve

    from .conftest import random_windows, tiny_model

    model = tiny_model("llama")
    old = moecarve.CarveConfig.from_string("S1A2E8", selection="topk")  # folders before threshold selection: top-A
    moecarve.carve(model, old, random_windows(4, 64), device="cpu", progress=False)
    moecarve.save(model, tmp_path / "old")
    ids = random_windows(1, 16)
    with torch.no_grad():
        expected = model(ids).logits
    for f in (tmp_path / "old").glob("*.safetensors"):  # rewrite as the earlier layout
        sd = load_file(f)
        sd = {k: unpack_nibbles(v).contiguous() if k.endswith("router.codes") else v for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for entry in cfg["moecarve"]["modules"].values():
        for key in ("shadow_layout", "selection", "mean_active"):
            entry.pop(key, None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    loaded = moecarve.load(tmp_path / "old")
    router = next(m for m in loaded.modules() if isinstance(m, ShadowRouter))
    assert router.codes.dtype == torch.int8 and router.codes.shape[-1] == model.config.hidden_size
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "old", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(remote(ids).logits, expected, atol=1e-6, rtol=1e-6)
        moecarve.use_kernels(loaded, "cpu")  # the C kernels read the int8 layout too
        torch.testing.assert_close(loaded(ids[:, :1]).logits, expected[:, :1], atol=1e-5, rtol=1e-5)
