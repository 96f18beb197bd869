"""The "fitted" carving method: |h|-profile grouping, fitted router, ridge refit, oracle diagnostics."""

from __future__ import annotations

import pytest
import torch

import moecarve
from moecarve.carve import carve
from moecarve.carving.ffn import DenseFFN
from moecarve.carving.methods import carve_ffn
from moecarve.carving.oracle import NeuronOracleFFN, OracleRouter, expert_mass, oracle_indices, router_recall
from moecarve.carving.profile_grouping import group_by_profiles
from moecarve.carving.cholesky import InPlaceCholesky
from moecarve.carving.reconstruct import RIDGE_GRID, Selection, add_gram_, keep_mask, refit_down
from moecarve.config import CarveConfig, ConfigError
from moecarve.modules.moe import AnalyticRouter, FittedRouter, ShadowRouter, quantize_rows
from tests.conftest import random_windows, tiny_model


def random_ffn(d: int = 32, inter: int = 64, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        gate=torch.randn(inter, d, generator=g) / d**0.5,
        up=torch.randn(inter, d, generator=g) / d**0.5,
        down=torch.randn(d, inter, generator=g) / inter**0.5,
        act="silu",
    )


def planted_ffn(n_clusters: int = 4, per: int = 8, d: int = 16, seed: int = 0) -> tuple[DenseFFN, torch.Tensor]:
    """An FFN whose neurons form n_clusters co-active blocks: block j reads only input direction j.

    Returns the FFN and each neuron's planted block [I]. A token along direction j activates block j
    alone, so the grouping must recover the blocks and the router must pick block j.
    """
    g = torch.Generator().manual_seed(seed)
    inter = n_clusters * per
    block = torch.randperm(inter, generator=g) % n_clusters  # shuffled so that order gives nothing away
    gate = 0.05 * torch.randn(inter, d, generator=g)
    up = 0.05 * torch.randn(inter, d, generator=g)
    gate[torch.arange(inter), block] += 2.0
    up[torch.arange(inter), block] += 1.0 + torch.rand(inter, generator=g)
    return DenseFFN(gate=gate, up=up, down=torch.randn(d, inter, generator=g) / inter**0.5, act="silu"), block


def planted_tokens(n: int, n_clusters: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(n_clusters, (n,), generator=g)
    x = 0.1 * torch.randn(n, d, generator=g)
    x[torch.arange(n), which] += 1.0 + torch.rand(n, generator=g)
    return x, which


def test_config_accepts_fitted_and_validates_its_fields():
    cfg = CarveConfig.from_string("S0A16E64", method="fitted")
    assert cfg.n_routed == 64 and cfg.active_fraction == 0.25
    for bad in (dict(profile_iters=0), dict(probes_per_expert=-1), dict(holdout=1.0), dict(method="nope")):
        with pytest.raises(ConfigError):
            CarveConfig.from_string("S2A2E8", **bad)


def test_profile_grouping_recovers_planted_blocks_and_is_balanced():
    ffn, block = planted_ffn()
    x, _ = planted_tokens(512, 4, 16, seed=1)
    grouping = group_by_profiles(ffn.hidden(x), n_shared=0, n_routed=4, iters=5)
    assert sorted(grouping.experts.reshape(-1).tolist()) == list(range(32))  # a partition, 8 each
    for row in grouping.experts:
        assert block[row].unique().numel() == 1  # each expert is one planted block


def test_fitted_router_matches_the_oracle_where_it_must():
    ffn, _ = planted_ffn()
    x, _ = planted_tokens(1024, 4, 16, seed=1)
    moe, report = carve_ffn(ffn, x, CarveConfig.from_string("S0A1E4", method="fitted", shadow_bits=0, refit=False))
    assert isinstance(moe.router, FittedRouter)
    x_new, which = planted_tokens(512, 4, 16, seed=2)  # fresh tokens
    _, idx = moe.router(x_new)
    oracle = oracle_indices(expert_mass(ffn.hidden(x_new).abs(), moe_groups(moe, ffn)), 1)
    assert router_recall(idx, oracle, 4) == 1.0
    assert report.router_recall == 1.0


def moe_groups(moe, ffn: DenseFFN) -> torch.Tensor:
    """Recover each routed expert's neuron indices [E, m] by matching its gate rows to the FFN's."""
    m = moe.spec.expert_size
    rows = moe.experts.in_proj[:, :m]  # [E, m, d] gate rows
    return torch.cdist(rows.reshape(-1, rows.shape[-1]), ffn.gate).argmin(dim=-1).view(-1, m)


def test_mean_mass_by_column_blocks_equals_the_whole_tensor_mean():
    """group_by_profiles never holds |h| [T, I] whole: its mean and routed profiles are column slices of it."""
    from moecarve.carving.profile_grouping import mass_profiles, mean_mass

    g = torch.Generator().manual_seed(11)
    h = torch.randn(700, 600, generator=g) * torch.rand(600, generator=g)
    down = torch.randn(24, 600, generator=g)
    for weights in (None, down):
        whole = h.abs() if weights is None else h.abs() * weights.norm(dim=0)
        torch.testing.assert_close(mean_mass(h, weights), whole.mean(dim=0), rtol=1e-6, atol=0)
        cols = torch.tensor([5, 2, 599, 300])
        assert torch.equal(mass_profiles(h, weights, cols), whole[:, cols])
    h_before = h.clone()
    mass_profiles(h, None, cols), mean_mass(h)
    assert torch.equal(h, h_before)  # h itself is never modified


def test_refit_lowers_the_reconstruction_error():
    ffn = random_ffn()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 32, generator=g)
    h = ffn.hidden(x)
    experts = torch.randperm(64, generator=g).view(8, 8)
    idx = torch.randint(8, (2048, 3), generator=g)
    keep = keep_mask(64, torch.zeros(0, dtype=torch.long), experts, idx)
    assert keep.sum(dim=1).le(24).all() and keep.sum(dim=1).ge(8).all()
    y = h @ ffn.down.t()

    def err(w):
        return float(((h * keep) @ w.t() - y).pow(2).sum() / y.pow(2).sum())

    refit = refit_down(h, Selection(torch.zeros(0, dtype=torch.long), experts, idx), ffn.down, holdout=0.25)
    assert refit.heldout_after < refit.heldout_before  # better on tokens the fit did not see
    assert err(refit.down) < err(ffn.down)  # and on the calibration tokens (ridge towards W_0 cannot do worse)


def test_refit_is_the_closed_form_ridge_solution():
    """With no hold-out, W = W_0 + C (G + lam' I)^{-1}, lam' = the grid's largest lam * mean diag G, solved
    directly in float64."""
    ffn = random_ffn()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1300, 32, generator=g)  # several token chunks, the last one partial
    h = ffn.hidden(x)
    shared = torch.arange(0, 64, 8)  # 8 shared neurons
    rest = torch.tensor([i for i in range(64) if i % 8])
    experts = rest[torch.randperm(56, generator=g)].view(7, 8).sort(dim=1).values
    idx = torch.randint(7, (1300, 2), generator=g)
    keep = keep_mask(64, shared, experts, idx)
    hk = (h * keep).double()
    w0 = ffn.down.double()
    gram = hk.t() @ hk
    cross = (h.double() @ w0.t() - hk @ w0.t()).t() @ hk
    lam = RIDGE_GRID[-1] * float(gram.diagonal().mean())
    want = w0 + torch.linalg.solve(gram + lam * torch.eye(64, dtype=torch.float64), cross.t()).t()
    refit = refit_down(h, Selection(shared, experts, idx), ffn.down, holdout=0.0)
    torch.testing.assert_close(refit.down.double(), want, atol=1e-5, rtol=1e-4)
    assert refit.ridge == RIDGE_GRID[-1]


def test_gram_from_blocks_is_the_full_product():
    """add_gram_ (the two halves' blocks, the off-diagonal one mirrored) adds hk^T hk, odd widths too."""
    g = torch.Generator().manual_seed(5)
    for width in (1, 7, 64):
        hk = torch.randn(300, width, generator=g, dtype=torch.float64)
        gram = torch.eye(width, dtype=torch.float64)
        add_gram_(gram, hk)
        torch.testing.assert_close(gram, torch.eye(width, dtype=torch.float64) + hk.t() @ hk, atol=1e-10, rtol=1e-12)


def test_refit_with_intercept_is_the_centred_ridge_solution():
    """intercept=True: W = W_0 + C_c (G_c + lam' I)^{-1} on centred activations, b = mean(R) - D mean(H_k);
    and a planted constant in the dropped output is what b picks up on held-out tokens."""
    ffn = random_ffn()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1300, 32, generator=g)
    h = ffn.hidden(x).abs()  # one-signed activations: the dropped output has a mean a bias can take
    experts = torch.randperm(64, generator=g).view(8, 8)
    idx = torch.randint(8, (1300, 2), generator=g)
    keep = keep_mask(64, torch.zeros(0, dtype=torch.long), experts, idx)
    hk, w0 = (h * keep).double(), ffn.down.double()
    res = (h.double() - hk) @ w0.t()  # R: the dense output hard zeroing loses
    mu_h, mu_r = hk.mean(0), res.mean(0)
    gram = (hk - mu_h).t() @ (hk - mu_h)
    cross = (res - mu_r).t() @ (hk - mu_h)
    lam = RIDGE_GRID[-1] * float(gram.diagonal().mean())
    d_want = torch.linalg.solve(gram + lam * torch.eye(64, dtype=torch.float64), cross.t()).t()
    refit = refit_down(h, Selection(torch.zeros(0, dtype=torch.long), experts, idx), ffn.down, holdout=0.0, intercept=True)
    torch.testing.assert_close(refit.down.double(), w0 + d_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(refit.bias.double(), mu_r - d_want @ mu_h, atol=1e-5, rtol=1e-4)
    plain = refit_down(h, Selection(torch.zeros(0, dtype=torch.long), experts, idx), ffn.down, holdout=0.25)
    with_b = refit_down(h, Selection(torch.zeros(0, dtype=torch.long), experts, idx), ffn.down, holdout=0.25, intercept=True)
    assert plain.bias is None and with_b.bias is not None
    assert with_b.heldout_after < plain.heldout_after  # the mean of what is dropped, recovered on unseen tokens


@pytest.mark.parametrize("n,block", [(7, 3), (64, 64), (200, 48)])
def test_in_place_cholesky_solves_and_restores_the_matrix(n, block):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(3 * n, n, generator=g)
    gram = a.t() @ a
    gram = (gram + gram.t()) / 2  # exactly symmetric, so that restore() must give it back bit for bit
    original = gram.clone()
    system = InPlaceCholesky(gram, block=block)
    for shift in (1e-2, 3.0):
        b = torch.randn(5, n, generator=g)
        x = b.clone().t()  # a strided [n, 5] view: solve_ writes through it
        assert system.factor(shift)
        assert not torch.equal(gram, original)  # the factor really lives in gram's lower triangle
        system.solve_(x)
        want = torch.linalg.solve(original.double() + shift * torch.eye(n, dtype=torch.float64), b.double().t())
        torch.testing.assert_close(x.double(), want, atol=1e-4, rtol=1e-3)
        system.restore()
        assert torch.equal(gram, original)


def test_in_place_cholesky_reports_an_indefinite_matrix_and_leaves_it_intact():
    gram = torch.diag(torch.tensor([2.0, 1.0, -5.0, 3.0]))
    original = gram.clone()
    system = InPlaceCholesky(gram, block=2)
    assert not system.factor(0.0)
    assert torch.equal(gram, original)
    with pytest.raises(RuntimeError, match="factor"):
        system.solve_(torch.ones(4, 1))
    assert system.factor(6.0)  # shifted past the negative eigenvalue


def test_oracle_routing_with_every_expert_on_equals_dense():
    ffn = random_ffn()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    moe, _ = carve_ffn(ffn, x, CarveConfig.from_string("S1A7E8", method="fitted", refit=False))
    moe.router = OracleRouter(moe.experts, top_k=7)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-5, rtol=1e-4)


def test_neuron_oracle_keeps_everything_at_full_fraction_and_drops_at_half():
    ffn = random_ffn()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(NeuronOracleFFN(ffn, 1.0)(x), ffn(x), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(NeuronOracleFFN(ffn, 0.5)(x), ffn(x), atol=1e-4)


def test_cmoe_method_is_untouched():
    ffn = random_ffn()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(6))
    moe, report = carve_ffn(ffn, x, CarveConfig.from_string("S2A2E8", method="cmoe", k_act=4))
    assert isinstance(moe.router, AnalyticRouter)
    assert report.router_recall is None and report.refit_error is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fitted_carve_saves_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    ids = random_windows(1, 16)
    cfg = CarveConfig.from_string("S1A2E8", method="fitted", shadow_bits=0)
    report = carve(model, cfg, random_windows(4, 64), device="cpu", progress=False)
    assert all(0.0 <= r.router_recall <= 1.0 for r in report.layers)
    entries = [e for e in model.config.moecarve["modules"].values() if e["type"] == "moe"]
    assert len(entries) == 2 and all(e["router"] == "fitted" and e["router_probes"] == 2 * 7 for e in entries)
    moecarve.save(model, tmp_path / arch, report=report)
    loaded = moecarve.load(tmp_path / arch)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def test_quantize_rows_is_within_half_a_step():
    w = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(7))
    for bits in (2, 4, 8):
        codes, scale = quantize_rows(w, bits)
        assert codes.dtype == torch.int8 and scale.shape == (6, 10)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        qmax, step = 2 ** (bits - 1) - 1, scale.unsqueeze(-1)
        err = (codes.float() * step - w).abs()
        inside = w.abs() <= qmax * step  # below 8 bits the step may clip the largest weights of a row
        assert (err[inside] <= step.expand_as(w)[inside] / 2 + 1e-6).all()
        assert torch.equal(codes[~inside].abs(), torch.full_like(codes[~inside], qmax))  # clipped: the end of the grid
        assert torch.equal(codes[~inside].sign(), w[~inside].sign().to(torch.int8))
        if bits == 8:
            assert inside.all()


def test_shadow_router_matches_the_oracle_where_it_must():
    ffn, _ = planted_ffn()
    x, _ = planted_tokens(1024, 4, 16, seed=1)
    moe, report = carve_ffn(ffn, x, CarveConfig.from_string("S0A1E4", method="fitted", shadow_bits=4, refit=False))
    assert isinstance(moe.router, ShadowRouter) and moe.router.codes.dtype == torch.uint8  # two codes per byte
    x_new, _ = planted_tokens(512, 4, 16, seed=2)
    _, idx = moe.router(x_new)
    oracle = oracle_indices(expert_mass(ffn.hidden(x_new).abs(), moe_groups(moe, ffn)), 1)
    assert router_recall(idx, oracle, 4) == 1.0 and report.router_recall == 1.0


def test_shadow_router_tracks_the_oracle_on_random_weights_as_bits_grow():
    ffn = random_ffn(d=64, inter=256)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(8))
    recalls = {}
    for bits in (2, 8):
        moe, report = carve_ffn(ffn, x, CarveConfig.from_string("S0A4E16", method="fitted", shadow_bits=bits, refit=False,
                                                                selection="topk"))  # fmt: skip
        recalls[bits] = report.router_recall
    assert recalls[8] > 0.97 and recalls[8] > recalls[2]  # 8 bits: the oracle up to rounding


def test_shadow_router_with_every_expert_on_equals_dense():
    ffn = random_ffn()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(9))
    moe, _ = carve_ffn(ffn, x, CarveConfig.from_string("S1A7E8", method="fitted", shadow_bits=4, refit=False))
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-5, rtol=1e-4)


def test_shadow_bits_are_validated():
    for bad in (1, 9, -1):
        with pytest.raises(ConfigError, match="shadow_bits"):
            CarveConfig.from_string("S2A2E8", method="fitted", shadow_bits=bad)


def test_shadow_carve_saves_and_reloads_with_and_without_moecarve(tmp_path):
    import transformers

    model = tiny_model("llama")
    ids = random_windows(1, 16)
    report = carve(model, CarveConfig.from_string("S1A2E8", method="fitted", shadow_bits=4), random_windows(4, 64),
                   device="cpu", progress=False)  # fmt: skip
    entries = [e for e in model.config.moecarve["modules"].values() if e["type"] == "moe"]
    assert all(e["router"] == "shadow" and e["shadow_bits"] == 4 for e in entries)
    moecarve.save(model, tmp_path / "shadow", report=report)
    expected = model(ids).logits
    loaded = moecarve.load(tmp_path / "shadow")
    router = next(m for m in loaded.modules() if isinstance(m, ShadowRouter))
    assert router.codes.dtype == torch.uint8 and router.codes.shape[-1] == model.config.hidden_size // 2
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=1e-6)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shadow", trust_remote_code=True)
    torch.testing.assert_close(remote(ids).logits, expected, atol=1e-6, rtol=1e-6)
