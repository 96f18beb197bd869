"""Every fast path of the carved MoE layer equals the reference CarvedMoE forward.

CPU path: in this process. Triton kernels: through the interpreter (TRITON_INTERPRET=1 on CPU
tensors) in a child pytest process, since the variable must be set before triton is imported and
must not leak into other tests. Real-GPU tests skip without CUDA.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from moecarve.kernels import cpu as cpu_kernels
from moecarve.kernels import moe_decode_cpu, route
from moecarve.modules.fast import KERNEL_ROUTERS, moe_tensors, use_kernels
from moecarve.modules.moe import ROUTERS, CarvedMoE, MoESpec

IN_INTERPRETER = os.environ.get("MOECARVE_TRITON_CHILD") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
D = 64  # hidden size of the random layers


def random_moe(
    *, S: int = 1, E: int = 7, A: int = 1, m: int = 24, act: str = "silu", gated: bool = True,
    in_bias: bool = False, out_bias: bool = False, router: str = "analytic", norm_topk_prob: bool = False,
    hot: int | None = None, cold: tuple[int, ...] = (), dtype: torch.dtype = torch.float32, seed: int = 0,
    d: int = D, probes: int = 0,
) -> CarvedMoE:  # fmt: skip
    """A CarvedMoE with random weights (S shared, E routed of size m, top-A) whose outputs are O(1).

    hot: expert every token picks first (a large router bias); cold: experts no token picks.
    probes: the fitted router's probe neurons. The shadow router's codes are random.
    """
    extra = {"shadow_bits": 4, "shadow_layout": "nibbles"} if router == "shadow" else {}
    spec = MoESpec(
        hidden_size=d, expert_size=m, n_shared=S, n_routed=E, top_k=A, act=act, gated=gated,
        in_bias=in_bias, out_bias=out_bias, router=router, norm_topk_prob=norm_topk_prob, router_probes=probes, **extra,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    moe = CarvedMoE(spec)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for b in moe.buffers():  # the shadow router's codes: 4-bit (two per byte) or int8
            if b.dtype == torch.int8:
                b.copy_(torch.randint(-7, 8, b.shape, generator=g))
            elif b.dtype == torch.uint8:
                b.copy_(torch.randint(0, 256, b.shape, generator=g))
        moe.router.scale.copy_(torch.randn(E, generator=g) * 0.5)  # exercise the combine weights
        moe.router.bias.copy_(torch.randn(E, generator=g) * 1e-3)
        if hot is not None:
            moe.router.bias[hot] = 10.0
        for e in cold:
            moe.router.bias[e] = -10.0
    return moe.to(dtype).eval()


CASES = {
    "s1a1": dict(),
    "s0a1": dict(S=0),
    "s2a2": dict(S=2, A=2, E=6),
    "a_all": dict(S=1, A=7, E=7),  # A = E - S: every routed expert
    "plain_gelu": dict(gated=False, act="gelu"),
    "plain_relu_bias": dict(gated=False, act="relu", in_bias=True, out_bias=True, A=2),
    "gated_bias": dict(in_bias=True, out_bias=True, A=3),
    "gelu_tanh": dict(act="gelu_pytorch_tanh", A=2),
    "s0_bias_only": dict(S=0, out_bias=True, A=2),
    "linear": dict(router="linear", A=2),
    "linear_norm": dict(router="linear", norm_topk_prob=True, A=3, S=0),
    "one_hot_expert": dict(hot=3),
    "cold_experts": dict(A=2, cold=(0, 2, 5)),
}
# routers the kernels do not compute: routed by the module's own router, experts by the kernels
OWN_ROUTER_CASES = {
    "fitted": dict(router="fitted", probes=2, A=2),
    "fitted_no_probes": dict(router="fitted", S=0),
    "fitted_bias": dict(router="fitted", probes=1, in_bias=True, out_bias=True, A=3),
    "fitted_plain": dict(router="fitted", probes=2, gated=False, act="gelu", A=2),
}
if "shadow" in ROUTERS:
    OWN_ROUTER_CASES["shadow"] = dict(router="shadow", A=2)


def reference(moe: CarvedMoE, x: torch.Tensor) -> torch.Tensor:
    use_kernels(moe, "torch")
    with torch.no_grad():
        return moe(x)


def clear_tokens(moe: CarvedMoE, T: int, seed: int = 0, margin: float = 0.05) -> torch.Tensor:
    """[T, d] random tokens (in the layer's dtype) whose A-th router score exceeds the (A+1)-th by a `margin` fraction.

    In bfloat16 two paths may round a near tie differently and pick another expert: a different
    but equally right answer. Equivalence is asserted on tokens without one.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64 * T, moe.spec.hidden_size, generator=g).to(moe.router.scale)  # its dtype and device
    with torch.no_grad():
        s = (moe.router.logits(x).softmax(-1) + moe.router.bias).sort(dim=-1, descending=True).values
    A = moe.router.top_k
    clear = x[s[:, A - 1] - s[:, A] > margin * s[:, A - 1].abs()]
    assert clear.shape[0] >= T, "too few clearly routed tokens among the candidates"
    return clear[:T]


def fast(moe: CarvedMoE, x: torch.Tensor, backend: str) -> torch.Tensor:
    use_kernels(moe, backend)
    try:
        with torch.no_grad():
            return moe(x)
    finally:
        use_kernels(moe, "torch")


# ----------------------------------------------------------------------------------------- CPU path


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 2, 4])  # the binding takes T <= CPU_MAX_TOKENS; any_T below covers more
def test_cpu_path_matches_reference(case: str, T: int) -> None:
    moe = random_moe(**CASES[case])
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(fast(moe, x, "cpu"), reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["gathered", "union"])
@pytest.mark.parametrize("T", [2, 3, 5, 17, 64])
@pytest.mark.parametrize("case", CASES)
def test_cpu_paths_match_reference(case: str, T: int, path: str) -> None:
    """Both T > 1 paths, forced, on every layer kind: odd T, all tokens on one expert (one_hot_expert),
    experts no token picks (cold_experts, also inside the union's span), A = 1 and A = E (a_all)."""
    moe = random_moe(**CASES[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe), path), reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 5, 8, 33, 64])
@pytest.mark.parametrize("case", OWN_ROUTER_CASES)
def test_cpu_path_own_router(case: str, T: int) -> None:
    """Fitted (and shadow) routers: the module routes, the CPU path computes the experts."""
    moe = random_moe(**OWN_ROUTER_CASES[case])
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T))
    for path in ("gathered", "union"):
        out = moe_decode_cpu(x[0], moe_tensors(moe), path)
        torch.testing.assert_close(out, reference(moe, x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(moe, x, "cpu"), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_cpu_rule_picks_each_path(monkeypatch) -> None:
    """`use_union` on its own terms, and moe_decode_cpu(path="auto") following it where the C
    kernels are not built."""
    monkeypatch.setattr(cpu_kernels, "native_ok", lambda t: False)
    moe = random_moe(S=1, E=7, A=2, m=1024, cold=(1, 2, 3, 4, 5))  # experts of ~800 KB: reading them dominates
    t = moe_tensors(moe)
    assert cpu_kernels.use_union(8, 2, 7, 7, t)  # every expert hit: one GEMM beats seven pairs
    assert not cpu_kernels.use_union(8, 2, 2, 7, t)  # two hit at the ends: the span reads 3.5x the bytes
    assert not cpu_kernels.use_union(64, 1, 7, 7, t)  # compute bound: 64 x 7 expert rows vs 64 x 1
    assert cpu_kernels.use_union(8, 1, 2, 7, moe_tensors(random_moe(E=7, m=8)))  # tiny experts: op overhead rules

    ran = []
    for name in ("_union", "_gathered"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: ran.append(name) or real(*a))

    def run(moe: CarvedMoE, T: int) -> str:
        ran.clear()
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
        torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe)), reference(moe, x), atol=1e-5, rtol=1e-5)
        return ran[0] if ran else "batch-1"

    assert run(moe, 1) == "batch-1"
    assert run(moe, 8) == "_gathered"  # every token picks experts 0 and 6 (the others are cold)
    assert run(random_moe(S=1, E=7, A=6, m=1024), 8) == "_union"  # A = E: every expert hit
    assert run(random_moe(S=1, E=7, A=1, m=1024, hot=3), 9) == "_union"  # all tokens on one expert: span 1


def test_union_reads_weights_in_place(monkeypatch) -> None:
    """The union path slices the stacked weights (views), it never copies them."""
    moe = random_moe(S=1, E=7, A=6, m=64)
    t = moe_tensors(moe)
    seen = []
    real_linear, real_bmm = torch.nn.functional.linear, torch.bmm
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(w) or real_linear(x, w, b))
    monkeypatch.setattr(torch, "bmm", lambda a, b: seen.append(a) or real_bmm(a, b))
    moe_decode_cpu(torch.randn(5, D), t, "union")
    weights = [w for w in seen if w.numel() >= t.in_proj[0].numel()]  # not the router's few rows
    storages = {p.untyped_storage().data_ptr() for p in (t.in_proj, t.out_proj, t.shared_in)}
    assert len(weights) == 3 and all(w.untyped_storage().data_ptr() in storages for w in weights)


@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_cpu_function_any_T(T: int) -> None:
    """moe_decode_cpu itself is right for any T (the module binding only uses it for small T)."""
    moe = random_moe(S=1, A=2, in_bias=True, out_bias=True)
    x = torch.randn(T, D)
    torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe)), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_route_matches_module_routers() -> None:
    x = torch.randn(9, D)
    for case in ("s1a1", "a_all", "linear", "linear_norm", "plain_gelu"):
        moe = random_moe(**CASES[case])
        w, idx = route(x, moe_tensors(moe))
        w_ref, idx_ref = moe.router(x)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 9])
def test_cpu_path_bfloat16(T: int) -> None:
    moe = random_moe(S=1, A=2, dtype=torch.bfloat16)
    x = clear_tokens(moe, T, seed=T)  # no near ties that bf16 rounding could break either way
    ref = reference(moe, x)
    torch.testing.assert_close(fast(moe, x, "cpu"), ref, atol=7e-2, rtol=2e-2)  # a few bf16 ulps
    for path in ("gathered", "union"):
        torch.testing.assert_close(moe_decode_cpu(x, moe_tensors(moe), path), ref, atol=7e-2, rtol=2e-2)


def test_large_T_falls_back_to_reference() -> None:
    moe = random_moe(A=2)
    x = torch.randn(300, D)
    assert torch.equal(fast(moe, x, "cpu"), reference(moe, x))


def test_use_kernels_walks_switches_and_copies() -> None:
    model = torch.nn.Sequential(random_moe(), torch.nn.Linear(D, D), random_moe(A=2), random_moe(router="fitted"))
    assert use_kernels(model, "cpu") == 3
    assert all(m.fast_forward is not None for m in (model[0], model[2], model[3]))
    twin = copy.deepcopy(model)  # the hook is a module-level function: the copy runs its own weights
    with torch.no_grad():
        twin[0].experts.in_proj.mul_(2)
    x = torch.randn(1, D)
    with torch.no_grad():
        assert not torch.allclose(twin[0](x), model[0](x))
    assert torch.equal(twin[3].router.weight, model[3].router.weight)
    with torch.no_grad():  # the copy routes with its own router: force another expert than the original's
        other = (int(model[3].router(x)[1]) + 1) % 7
        twin[3].router.bias[other] = 10.0
        assert not torch.allclose(twin[3](x), model[3](x))
        torch.testing.assert_close(twin[3](x), reference(twin[3], x), atol=1e-5, rtol=1e-5)
    assert use_kernels(model, "torch") == 3
    assert model[0].fast_forward is None
    assert "fast_forward" not in model.state_dict()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        use_kernels(model, "cuda-magic")


def test_autograd_falls_back_to_reference() -> None:
    """With autograd recording the fast paths step aside, so training sees the reference ops."""
    moe = random_moe(A=2)
    x = torch.randn(1, D, requires_grad=True)
    use_kernels(moe, "cpu")
    moe(x).sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    use_kernels(moe, "torch")
    moe(x).sum().backward()
    assert torch.equal(g_fast, x.grad)


def test_functional_activations_match_transformers() -> None:
    from transformers.activations import ACT2FN

    from moecarve.modules.fast import FUNCTIONAL_ACTS

    x = torch.randn(1000) * 4
    for name, fn in FUNCTIONAL_ACTS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name


def test_router_pack_follows_updates() -> None:
    moe = random_moe()
    x = torch.randn(1, D)
    use_kernels(moe, "cpu")
    with torch.no_grad():
        moe(x)  # builds the packed router
        moe.router.gate.mul_(-3.0)  # an in-place update (as an optimizer step) must be seen
        torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)
        use_kernels(moe, "cpu")
        moe(x)
        moe.router.bias = torch.zeros(7).index_fill_(0, torch.tensor([5]), 10.0)  # a new buffer (.to() does this)
        torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- Triton, through the interpreter


@pytest.mark.skipif(IN_INTERPRETER or not HAS_TRITON, reason="parent side of the interpreter tests")
def test_triton_interpreter() -> None:
    """Run the test_tri_* tests below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOECARVE_TRITON_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += [__file__, "-k", "test_tri_"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]


needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child")


# the interpreter runs a kernel program in Python: every case at T = 1, the ones that change the
# token/expert bookkeeping also at T = 5
TRI_CASES = [(c, 1) for c in CASES] + [(c, 5) for c in ("s2a2", "a_all", "gated_bias", "linear_norm", "cold_experts")]


@needs_interpreter
@pytest.mark.parametrize("case,T", TRI_CASES)
def test_tri_decode_matches_reference(case: str, T: int) -> None:
    moe = random_moe(**CASES[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case,T", [("fitted", 1), ("fitted_bias", 5), ("fitted_plain", 40)]
                         + ([("shadow", 3)] if "shadow" in OWN_ROUTER_CASES else []))  # fmt: skip
def test_tri_own_router_matches_reference(case: str, T: int) -> None:
    """Routers outside KERNEL_ROUTERS: the module routes, the decode (T <= 32) / prefill kernels run the experts."""
    moe = random_moe(**OWN_ROUTER_CASES[case])
    assert moe.spec.router not in KERNEL_ROUTERS
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case,T,bits,threshold", [
    ("s1a1", 1, 4, None), ("s2a2", 5, 4, None), ("plain_bias", 3, 4, None), ("single_neurons", 2, 4, None),
    ("small_odd", 1, 8, None), ("single_neurons", 3, 4, 0.6),
])  # fmt: skip
def test_tri_shadow_matches_reference(case: str, T: int, bits: int, threshold: float | None) -> None:
    """The shadow router's Triton kernels: quantise, score (packed 4-bit or int8 codes), select
    (top-A by bisection, or a threshold) and the decode experts, against the reference module."""
    from moecarve.kernels.triton_shadow import shadow_route_triton

    from .test_native import SHADOW_CASES, shadow_moe

    moe = shadow_moe(bits, threshold, **SHADOW_CASES[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    w, idx = shadow_route_triton(x, moe_tensors(moe))
    with torch.no_grad():
        w_ref, idx_ref = moe.router(x)
    for t in range(T):  # the same experts with the same weights (slot order may differ)
        got = {int(e): float(v) for e, v in zip(idx[t], w[t]) if e >= 0}
        ref = {int(e): float(v) for e, v in zip(idx_ref[t], w_ref[t]) if v != 0}
        assert got.keys() == ref.keys()
        assert all(abs(got[e] - ref[e]) < 1e-5 for e in got)
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case,T", [("single_neurons", 1), ("single_neurons_shared", 3), ("m3", 2), ("m17", 1)])
def test_tri_small_experts_match_reference(case: str, T: int) -> None:
    """Experts of <= 16 neurons run as one flat list of picked neurons (kernels.triton_neurons);
    m17 stays on the per-expert kernels."""
    from .test_native import FINE_CASES

    moe = random_moe(**FINE_CASES[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_tri_shadow_quantises_like_the_reference() -> None:
    from moecarve.kernels.triton_shadow import _pow2, _quantize_kernel
    from moecarve.modules.moe import quantize_tokens

    x = torch.randn(4, D) * 3
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, -2.5, 63.5, -0.4])  # ties to even at scale 1
    q, s = torch.empty(4, D), torch.empty(4)
    _quantize_kernel[(4,)](x, q, s, D, BLOCK_D=_pow2(D))
    q_ref, s_ref = quantize_tokens(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref[:, 0])


@needs_interpreter
def test_tri_router_and_32_tokens() -> None:
    from moecarve.kernels.triton_decode import route_triton

    moe = random_moe(S=1, A=3, E=7, in_bias=True)
    x = torch.randn(32, D)
    w, idx = route_triton(x, moe_tensors(moe))
    w_ref, idx_ref = moe.router(x)
    assert torch.equal(idx.long(), idx_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case,T", [("s1a1", 40), ("gated_bias", 33), ("plain_relu_bias", 50), ("a_all", 40),
                                    ("one_hot_expert", 40), ("cold_experts", 64)])  # fmt: skip
def test_tri_prefill_matches_reference(case: str, T: int) -> None:
    """Past 32 tokens the triton backend runs the grouped GEMM (expert-sorted, padded tiles)."""
    moe = random_moe(**CASES[case])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_tri_align_by_expert() -> None:
    from moecarve.kernels.triton_prefill import align_by_expert

    idx = torch.tensor([[2, 0], [2, 3], [0, 2]])  # N = 6 slots, experts 0: 2, 2: 3, 3: 1, 1 and 4: none
    slots, tiles = align_by_expert(idx, 5, 4)
    assert slots.numel() % 4 == 0 and tiles.numel() == slots.numel() // 4
    assert slots[:4].tolist() == [1, 4, 6, 6]  # expert 0's slots in order, padded with N
    assert slots[4:8].tolist() == [0, 2, 5, 6] and slots[8:12].tolist() == [3, 6, 6, 6]
    assert tiles.tolist()[:3] == [0, 2, 3] and all(e == 5 for e in tiles.tolist()[3:])


@needs_interpreter
def test_tri_bfloat16() -> None:
    moe = random_moe(S=1, A=2, dtype=torch.bfloat16)
    for T in (3, 40):  # decode and prefill kernels
        x = clear_tokens(moe, T)  # no near ties that bf16 rounding could break either way
        torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=7e-2, rtol=2e-2)  # a few bf16 ulps


@needs_interpreter
def test_tri_custom_ops_are_well_formed() -> None:
    """The ops have consistent fake (meta) kernels, so torch.compile can trace around them."""
    from moecarve.kernels import triton_decode as td

    t = moe_tensors(random_moe(S=1, A=2, in_bias=True, out_bias=True))
    x = torch.randn(2, D)
    w, idx = td.route_triton(x, t)
    checks = ("test_schema", "test_faketensor")
    args = (x, t.router_gate, t.router_up, t.router_scale, t.router_bias, 2, True, False, "silu")
    torch.library.opcheck(td.route_op, args, test_utils=checks)
    args = (x, idx, w, t.in_proj, t.out_proj, t.in_bias, t.shared_in, t.shared_out, t.shared_in_bias, t.out_bias)
    args += (True, "silu")
    torch.library.opcheck(td.experts_op, args, test_utils=checks)
    from moecarve.kernels import triton_shadow as ts

    from .test_native import shadow_moe

    t = moe_tensors(shadow_moe(A=2))
    args = (x, t.shadow_codes, t.shadow_scale, t.shadow_bias, t.router_bias, t.router_scale, None, t.expert_size, 2)
    torch.library.opcheck(ts.shadow_route_op, args + (True, "silu"), test_utils=checks)


@needs_interpreter
def test_tri_traces_without_graph_breaks() -> None:
    """Dynamo traces the whole Triton-backed layer as one graph (the kernels are opaque ops)."""
    moe = random_moe(S=1, A=2)
    x = torch.randn(3, D)
    ref = reference(moe, x)
    use_kernels(moe, "triton")
    with torch.no_grad():
        out = torch.compile(moe, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(IN_INTERPRETER or not HAS_TRITON, reason="needs triton")
def test_triton_kernels_compile_for_sm90() -> None:
    """The bf16 kernels type-check and assemble for an H100 (Triton's bundled ptxas; no GPU needed)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no CUDA backend")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moecarve.kernels import triton_decode as td
    from moecarve.kernels import triton_prefill as tp

    def build(kernel, consts: dict, ints: tuple[str, ...], int32_ptrs: tuple[str, ...] = ()) -> None:
        sig = {}
        for n in kernel.arg_names:
            sig[n] = "constexpr" if n in consts else "i32" if n in ints else "*i32" if n in int32_ptrs else "*bf16"
        src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))

    dot = dict(DOT_PREC="tf32", UPCAST=False)
    build(td._router_kernel, dict(A=2, ANALYTIC=True, HAS_UP=True, NORM_TOPK=False, ACT=0, BLOCK_E=8, BLOCK_K=128),
          ("E", "D"), ("idx_out_ptr",))  # fmt: skip
    up = dict(T=1, A=2, GATED=True, HAS_BIAS=True, ACT=0, BLOCK_T=16, BLOCK_A=2, BLOCK_M=16, BLOCK_K=128, **dot)
    build(td._up_kernel, up, ("D", "M", "NS", "E", "stride_we", "stride_be"), ("idx_ptr",))  # T = 1: batch-1 decode
    down = dict(A=2, HAS_SHARED=True, HAS_BIAS=True, BLOCK_T=16, BLOCK_A=2, BLOCK_N=16, BLOCK_K=64, **dot)
    build(td._down_kernel, down, ("T", "D", "M", "NS", "E", "stride_we"), ("idx_ptr",))
    build(tp._gemm_up_kernel, dict(A=2, GATED=True, HAS_BIAS=False, ACT=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, **dot),
          ("N", "D", "M", "E", "stride_we", "stride_be"), ("slots_ptr", "tile_expert_ptr"))  # fmt: skip
    build(tp._gemm_down_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, **dot),
          ("N", "D", "M", "E", "stride_we"), ("slots_ptr", "tile_expert_ptr"))  # fmt: skip

    from moecarve.kernels import triton_shadow as ts

    def build_typed(kernel, consts: dict, ints: tuple[str, ...], types: dict[str, str]) -> None:  # other pointers fp32
        sig = {n: "constexpr" if n in consts else "i32" if n in ints else types.get(n, "*fp32") for n in kernel.arg_names}
        src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))

    build_typed(ts._quantize_kernel, dict(BLOCK_D=4096), ("D",), {"x_ptr": "*bf16"})
    build_typed(ts._scores_kernel, dict(PACKED=True, GATED=True, HAS_BIAS=False, ACT=0, BLOCK_T=16, BLOCK_J=32, BLOCK_K=64),
                ("T", "D", "E", "M", "KW"), {"codes_ptr": "*u8", "b_ptr": "*bf16"})  # fmt: skip
    build_typed(ts._select_kernel, dict(A_PAD=4, HAS_THRESHOLD=False, BLOCK_E=16), ("E", "K"),
                {"idx_ptr": "*i32", "scale_ptr": "*bf16"})  # fmt: skip
    from moecarve.kernels import triton_neurons as tn

    build_typed(tn._rows_kernel, dict(GATED=True, HAS_BIAS=False, ACT=0, BLOCK_N=64, BLOCK_K=128), ("D", "M", "N", "A"),
                {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "idx_ptr": "*i32", "cw_ptr": "*bf16"})  # fmt: skip
    build_typed(tn._down_kernel, dict(BLOCK_N=32, BLOCK_D=128), ("D", "M", "N", "A"), {"w_ptr": "*bf16", "idx_ptr": "*i32"})


# ------------------------------------------------------------------------------------- real GPU

needs_cuda = pytest.mark.skipif(
    IN_INTERPRETER or not HAS_TRITON or not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 8, 32])
@pytest.mark.parametrize("case", ["s1a1", "a_all", "plain_relu_bias", "linear_norm", "one_hot_expert"])
def test_gpu_triton_decode(case: str, T: int, dtype: torch.dtype) -> None:
    moe = random_moe(**CASES[case], m=160, dtype=dtype).cuda()
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast(moe, x, "triton"), reference(moe, x), atol=tol, rtol=tol)


@needs_cuda
def test_gpu_auto_backend_is_graph_capturable_and_compiles() -> None:
    moe = random_moe(S=1, A=2, dtype=torch.bfloat16).cuda()
    x = clear_tokens(moe, 4)  # no near ties that bf16 rounding could break either way
    ref = reference(moe, x)
    use_kernels(moe, "auto")
    with torch.no_grad():
        moe(x)  # compile the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(x)
        graph.replay()
        torch.testing.assert_close(out, ref, atol=7e-2, rtol=2e-2)  # a few bf16 ulps
        compiled = torch.compile(moe, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, atol=7e-2, rtol=2e-2)  # a few bf16 ulps


# ------------------------------------------------------------------------------- loading with kernels


def _carve_kwargs() -> dict[str, dict]:
    from moecarve.config import CarveConfig

    fitted_probe = {"method": "fitted"}
    if "shadow_bits" in CarveConfig.__dataclass_fields__:  # the probe router, not the shadow one
        fitted_probe["shadow_bits"] = 0
    return {"default": {}, "cmoe": {"method": "cmoe"}, "fitted_probe": fitted_probe}


@pytest.mark.skipif(IN_INTERPRETER, reason="parent process only")
@pytest.mark.parametrize("method", _carve_kwargs())
def test_load_with_kernels_same_logits(tmp_path, method: str) -> None:
    """moecarve.load(dir, kernels=...) binds the fast paths; logits equal the reference forward's."""
    import moecarve
    from tests.conftest import random_windows, tiny_model

    model = tiny_model("llama")
    cfg = moecarve.CarveConfig.from_string("S1A1E4", **_carve_kwargs()[method])
    moecarve.carve(model, cfg, random_windows(4, 32), progress=False)
    moecarve.save(model, tmp_path / "c")
    plain = moecarve.load(tmp_path / "c")
    fast_model = moecarve.load(tmp_path / "c", kernels="cpu")
    moes = [m for m in fast_model.modules() if type(m).__name__ == "CarvedMoE"]
    assert moes and all(m.fast_forward is not None for m in moes)
    assert all(m.fast_forward is None for m in plain.modules() if type(m).__name__ == "CarvedMoE")
    ids = random_windows(2, 20, seed=3)
    with torch.no_grad():
        for batch in (ids[:1, :1], ids[:1, :7], ids[:, :16], ids):  # T = 1, 7, 32, 40 tokens per layer
            torch.testing.assert_close(fast_model(batch).logits, plain(batch).logits, atol=1e-5, rtol=1e-5)
        gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)  # decode steps: T = 1 and 2 per layer
        assert torch.equal(fast_model.generate(ids[:, :6], **gen), plain.generate(ids[:, :6], **gen))
    with pytest.raises(ValueError, match="unknown kernels"):
        moecarve.load(tmp_path / "c", kernels="gpu-magic")


@pytest.mark.skipif(IN_INTERPRETER, reason="parent process only")
def test_eval_cli_kernels_flag(tmp_path, reference_tokenizer) -> None:
    """`moecarve eval DIR --kernels cpu` gives the reference perplexity (64-token forwards: CPU path)."""
    import json

    import moecarve
    from moecarve.cli import main
    from tests.conftest import TEST_TXT, random_windows, tiny_model

    if not TEST_TXT.exists():
        pytest.skip("../shared/corpus/test.txt is not available")
    model = tiny_model("llama", vocab_size=len(reference_tokenizer))
    windows = random_windows(4, 32, vocab=len(reference_tokenizer))
    moecarve.carve(model, moecarve.CarveConfig.from_string("S1A1E4"), windows, progress=False)
    moecarve.save(model, tmp_path / "c", tokenizer=reference_tokenizer)
    ppl = {}
    for kernels in ("none", "cpu"):
        out = tmp_path / f"{kernels}.json"
        args = ["eval", str(tmp_path / "c"), "--ppl", str(TEST_TXT), "--seqlen", "16", "--max-chars", "2000",
                "--batch-size", "4", "--device", "cpu", "--kernels", kernels, "--json", str(out)]  # fmt: skip
        assert main(args) == 0
        ppl[kernels] = json.loads(out.read_text())["perplexity"]["perplexity"]
    assert ppl["cpu"] == pytest.approx(ppl["none"], rel=1e-5)
