"""The tail (carving/tail.py, modules.moe.TailNeurons): the neurons just below the router's cut,
added from the router's own estimates with 4-bit output columns."""

from __future__ import annotations

import pytest
import torch

from moecarve import CarveConfig
from moecarve.carving.ffn import DenseFFN
from moecarve.carving.methods import carve_ffn
from moecarve.config import ConfigError
from moecarve.modules.moe import unpack_nibbles


def random_ffn(d: int = 32, inter: int = 128, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(up=torch.randn(inter, d, generator=g) / d**0.5, down=torch.randn(d, inter, generator=g) / inter**0.5,
                    gate=torch.randn(inter, d, generator=g) / d**0.5, act="silu")  # fmt: skip


def inputs(n: int, d: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_the_tail_is_the_free_neurons_above_its_threshold_times_their_columns():
    ffn = random_ffn()
    moe, _ = carve_ffn(ffn, inputs(600), CarveConfig.from_string("S0A32E128", tail=0.25))
    tail = moe.tail
    assert tail is not None and tail.codes.shape == (128, 16)
    x = inputs(7, seed=5)
    with torch.no_grad():
        w, idx, est = moe.router(x, estimates=True)
        expected = moe.experts(x, idx, w)
        cols = unpack_nibbles(tail.codes).float()  # [N, d]
        for t in range(x.shape[0]):
            picked = set(idx[t][w[t] != 0].tolist())
            for n in range(128):
                e = float(est[t, n, 0])
                if n not in picked and abs(e) > float(tail.threshold):
                    expected[t] += e * float(tail.scale[n]) * cols[n]
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_the_columns_are_the_dense_down_columns_in_4_bits():
    """Each stored column, times its step and the neuron's score weight, is the dense down_proj column
    of that neuron within half a step (the clip search may clip a few large elements further)."""
    ffn = random_ffn()
    moe, _ = carve_ffn(ffn, inputs(600), CarveConfig.from_string("S0A32E128", tail=0.25, score_weight="none"))
    cols = unpack_nibbles(moe.tail.codes).float() * moe.tail.scale.unsqueeze(1)  # [N, d]
    gates = moe.experts.in_proj[:, 0]  # [E, d]: expert e's gate row is the dense neuron's
    neuron = (gates[:, None, :] == ffn.gate[None]).all(-1).float().argmax(dim=1)
    err = (cols - ffn.down[:, neuron].t()).abs()
    assert (err <= moe.tail.scale.unsqueeze(1) / 2 + 1e-6).float().mean() > 0.95


def test_the_threshold_adds_the_asked_neurons_per_token_on_average():
    ffn = random_ffn(inter=256)
    x = inputs(800)
    moe, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A64E256", tail=0.125))
    assert moe.spec.tail_neurons == pytest.approx(32, abs=0.01)
    with torch.no_grad():
        w, idx, est = moe.router(x, estimates=True)
    free = torch.ones(800, 256, dtype=torch.bool).scatter_(1, idx, w == 0)
    count = (free & (est[..., 0].abs() > moe.tail.threshold)).sum(dim=1).float()
    assert count.mean() == pytest.approx(32, abs=0.01) and count.std() > 0  # per token, not fixed


def test_a_tail_brings_the_carved_output_closer_to_the_dense_one():
    ffn = random_ffn(inter=256)
    x, held = inputs(1000), inputs(300, seed=9)
    dense = ffn(held)

    def error(tail: float) -> float:
        moe, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A64E256", tail=tail))
        with torch.no_grad():
            return float((moe(held) - dense).pow(2).sum() / dense.pow(2).sum())

    none, quarter, half = error(0.0), error(0.25), error(0.5)
    assert quarter < 0.8 * none and half < quarter


def test_the_carve_replays_the_tailed_module_and_counts_its_bytes():
    from moecarve.carve import ffn_bytes

    ffn = random_ffn()
    x = inputs(600)
    moe, _, y = carve_ffn(ffn, x, CarveConfig.from_string("S0A32E128", tail=0.25), outputs=True)
    with torch.no_grad():
        torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-5)
    plain, _, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A32E128", tail=0.0), outputs=True)
    assert plain.tail is None and plain.spec.tail_neurons == 0
    per_neuron = moe.tail.codes.shape[1] + 4  # its 4-bit column and its step
    extra = ffn_bytes(moe, ffn)[0] - ffn_bytes(plain, ffn)[0]
    assert extra == pytest.approx(moe.spec.tail_neurons * per_neuron, abs=2)


@pytest.mark.parametrize("spec", ["S0A32E128", "S0A16E64", "S1A15E64"])  # single neurons, pairs, a shared expert
@pytest.mark.parametrize("T", [1, 3, 9])
def test_the_cpu_kernel_path_computes_a_tailed_layer_as_the_reference(spec, T):
    """use_kernels' CPU path runs a layer with a tail in C (router with its estimates, experts, the
    tail: kernels.cpu.moe_decode_cpu_tail) and gives the reference forward's output."""
    from moecarve.kernels import native
    from moecarve.modules.fast import use_kernels

    if not native.available():
        pytest.skip("no C compiler: the CPU path is the torch one")
    moe, _ = carve_ffn(random_ffn(), inputs(600), CarveConfig.from_string(spec, tail=0.25))
    assert moe.tail is not None
    x = inputs(T, seed=4) * 2
    with torch.no_grad():
        ref = moe(x)
        use_kernels(moe, "cpu")
        got = moe(x)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        moe.tail.threshold.fill_(float("inf"))  # the tail made a difference: the test is not vacuous
        assert (moe(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("spec,kw,tail", [
    ("S0A384E1536", {}, 0.25),
    ("S0A1344E1536", {}, 0.125),  # fewer left than the default: all that is left
    ("S0A1536E1536", {}, 0.0),  # every neuron picked: nothing left
    ("S2A2E8", {"method": "cmoe"}, 0.0),  # the CMoE routers estimate no neuron
    ("S2A2E8", {"shadow_bits": 0}, 0.0),  # the probe router neither
    ("S2A0E8", {}, 0.0),  # static pruning
    ("S0A384E1536", {"tail": 0.5}, 0.5),
])  # fmt: skip
def test_the_tail_default(spec, kw, tail):
    cfg = CarveConfig.from_string(spec, **kw)
    assert cfg.tail == pytest.approx(tail)
    assert CarveConfig.from_dict(cfg.to_dict()).tail == cfg.tail


def test_bad_tails_are_refused_and_old_configs_read_back_without_one():
    with pytest.raises(ConfigError, match="shadow router"):
        CarveConfig(method="cmoe", tail=0.25)
    with pytest.raises(ConfigError, match="exceeds"):
        CarveConfig.from_string("S0A384E512", tail=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        CarveConfig(tail=-0.1)
    d = CarveConfig.from_string("S0A384E1536").to_dict()
    del d["tail"]
    assert CarveConfig.from_dict(d).tail == 0.0
    # a layer given more experts than the average keeps the tail that still fits
    alloc = CarveConfig.from_string("S0A4E8", tail=0.25, layer_active=(2, 7))
    assert [alloc.for_layer(i).tail for i in range(2)] == [0.25, 0.125]
