"""Fine-grained carving (experts down to single neurons), threshold selection and static width
pruning (A = 0): grouping, calibration and the carved modules against what the maths says."""

from __future__ import annotations

import torch

import moecarve
from moecarve import CarveConfig, carve
from moecarve.carving import profile_grouping
from moecarve.carving.ffn import DenseFFN
from moecarve.carving.methods import carve_ffn, kth_largest, router_picks
from moecarve.carving.profile_grouping import balanced_bisection, group_by_profiles
from moecarve.modules.condensed import CondensedMLP
from moecarve.modules.fast import use_kernels

from .conftest import random_windows, tiny_model


def random_ffn(d: int = 32, inter: int = 64, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        gate=torch.randn(inter, d, generator=g) / d**0.5, up=torch.randn(inter, d, generator=g) / d**0.5,
        down=torch.randn(d, inter, generator=g) / inter**0.5, act="silu",
    )  # fmt: skip


def test_bisection_is_exactly_balanced_and_finds_planted_groups():
    k, m, T = 12, 5, 400  # 12 planted groups of 5 neurons sharing a direction, k not a power of two
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(T, k, generator=g).abs()
    truth = torch.randperm(k * m, generator=g) % k
    profiles = dirs[:, truth] + 0.05 * torch.rand(T, k * m, generator=g)
    labels = balanced_bisection(profiles.clone(), k, iters=10)
    assert torch.bincount(labels, minlength=k).tolist() == [m] * k
    for j in range(k):  # every found group is one planted group
        assert truth[labels == j].unique().numel() == 1


def test_single_neuron_experts_skip_grouping():
    h = torch.randn(200, 64).abs()
    h[:, :8] += 3.0  # the 8 most active neurons become shared
    grouping = group_by_profiles(h, n_shared=8, n_routed=56, iters=10)
    assert grouping.experts.shape == (56, 1)
    assert grouping.shared.tolist() == list(range(8))
    assert sorted(grouping.experts.flatten().tolist()) == list(range(8, 64))


def test_large_groupings_use_bisection(monkeypatch):
    monkeypatch.setattr(profile_grouping, "LP_MAX_VARIABLES", 10)  # force it at test size
    calls = []
    real = profile_grouping.balanced_bisection
    monkeypatch.setattr(profile_grouping, "balanced_bisection", lambda *a: calls.append(1) or real(*a))
    grouping = group_by_profiles(torch.randn(100, 64).abs(), n_shared=0, n_routed=16, iters=3)
    assert calls and grouping.experts.shape == (16, 4)
    assert sorted(grouping.experts.flatten().tolist()) == list(range(64))
    assert all((row[1:] > row[:-1]).all() for row in grouping.experts)  # rows ascending


def test_single_neuron_carve_runs_saves_and_matches_kernels(tmp_path):
    model = tiny_model("llama")
    ids = random_windows(1, 16)
    report = carve(model, CarveConfig.from_string("S8A24E128"), random_windows(4, 64), device="cpu", progress=False)
    assert all(r.expert_size == 1 for r in report.layers)
    with torch.no_grad():
        expected = model(ids).logits
        use_kernels(model, "cpu")
        torch.testing.assert_close(model(ids[:, :1]).logits, expected[:, :1], atol=1e-4, rtol=1e-4)
        use_kernels(model, "torch")
    moecarve.save(model, tmp_path / "fine", report=report)
    loaded = moecarve.load(tmp_path / "fine")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_threshold_picks_A_experts_on_average():
    ffn = random_ffn(d=32, inter=256)
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(1))
    cfg = CarveConfig.from_string("S0A64E256", selection="threshold", refit=False)
    moe, report = carve_ffn(ffn, x, cfg)
    assert moe.spec.selection == "threshold" and moe.spec.top_k == 128 and moe.spec.mean_active == 64
    with torch.no_grad():
        w, _ = moe.router(x)
    picked = (w != 0).sum(-1).float()
    assert abs(picked.mean().item() - 64) < 0.5  # calibrated on these tokens, counting the cap of 2A per token
    assert picked.std() > 0  # a per-token count, not a fixed one
    assert sum(report.load) == int(picked.sum())


def test_the_carve_picks_and_outputs_are_the_modules_own():
    """router_picks (the carve's routing of its calibration tokens) is the router's forward without
    the combine weights, and the outputs carve_ffn hands back for replay are the module's output."""
    ffn = random_ffn(d=32, inter=256, seed=3)
    x = torch.randn(700, 32, generator=torch.Generator().manual_seed(2))
    for selection in ("topk", "threshold"):
        for spec in ("S0A64E256", "S4A12E64", "S0A160E256"):  # the last: every expert a candidate (2A > E)
            moe, _, y = carve_ffn(ffn, x, CarveConfig.from_string(spec, selection=selection), outputs=True)
            with torch.no_grad():
                w, idx = moe.router(x)
                got, kept = router_picks(moe.router, x, chunk=256)
                assert torch.equal(got[:, 0], idx[:, 0])  # the best pick first, the rest as a set
                order = got.argsort(dim=1)
                assert torch.equal(got.gather(1, order), idx.sort(dim=1).values)
                if selection == "threshold":
                    assert torch.equal(kept.gather(1, order), (w != 0).gather(1, idx.argsort(dim=1)))
                else:
                    assert kept is None
                torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-5)
    _, _, none = carve_ffn(ffn, x, CarveConfig.from_string("S2A0E8"), outputs=True)  # static: nothing to replay
    assert none is None


def test_router_load_counts_only_the_kept_slots():
    from moecarve.carving.router import router_load

    g = torch.Generator().manual_seed(4)
    idx = torch.rand(500, 40, generator=g).argsort(dim=1)[:, :12]  # [T, A], distinct experts per token
    kept = torch.rand(500, 12, generator=g) < 0.4
    assert torch.equal(router_load(idx, 40, kept), torch.bincount(idx[kept], minlength=40))
    assert torch.equal(router_load(idx, 40), torch.bincount(idx.flatten(), minlength=40))


def test_kth_largest_selects_exactly_what_kthvalue_does():
    """The bracketed selection the threshold calibration uses equals torch's kthvalue: sampled
    brackets, ties and heavy tails, both ends, and a bracket that misses (all values equal but a few)."""
    g = torch.Generator().manual_seed(0)
    n = 300_000  # above the size where the sample bracket is used
    cases = [torch.randn(n, generator=g), torch.randint(0, 50, (n,), generator=g).float(),
             torch.randn(n, generator=g).exp().pow(3), torch.cat([torch.zeros(n - 5), torch.arange(5.0)])]  # fmt: skip
    for v in cases:
        for k in (1, 2, n // 7, n // 2, n - 3, n):
            assert kth_largest(v, k) == float(v.kthvalue(n - k + 1).values), k
    small = torch.randn(100, generator=g)
    assert kth_largest(small, 10) == float(small.kthvalue(91).values)


def test_threshold_carve_round_trips(tmp_path):
    model = tiny_model("llama")
    ids = random_windows(1, 16)
    carve(model, CarveConfig.from_string("S0A32E128", selection="threshold"), random_windows(4, 64), device="cpu",
          progress=False)  # fmt: skip
    with torch.no_grad():
        expected = model(ids).logits
    moecarve.save(model, tmp_path / "thr")
    loaded = moecarve.load(tmp_path / "thr")
    routers = [m for m in loaded.modules() if type(m).__name__ == "ShadowRouter"]
    assert routers and all(torch.isfinite(r.threshold) for r in routers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_static_pruning_is_the_dense_mlp_on_the_top_neurons():
    ffn = random_ffn()
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(2))
    mlp, report = carve_ffn(ffn, x, CarveConfig.from_string("S2A0E8", method="cmoe"))  # no refit: plain slicing
    assert isinstance(mlp, CondensedMLP) and mlp.spec.intermediate_size == 16
    assert report.router == "none" and report.statistic == "activation rate"
    # the kept neurons are the 16 most often active; the output is the dense FFN restricted to them
    from moecarve.carving.stats import activation_markers, activation_rates

    kept = torch.argsort(activation_rates(activation_markers(ffn, x, 10)), descending=True, stable=True)[:16].sort().values
    h = torch.nn.functional.silu(x @ ffn.gate[kept].t()) * (x @ ffn.up[kept].t())
    torch.testing.assert_close(mlp(x), h @ ffn.down[:, kept].t(), atol=1e-5, rtol=1e-5)


def test_static_fitted_refit_does_not_hurt_and_round_trips(tmp_path):
    model = tiny_model("llama")
    ids = random_windows(1, 16)
    report = carve(model, CarveConfig.from_string("S4A0E8"), random_windows(8, 64), device="cpu", progress=False)
    for r in report.layers:
        assert r.refit_error[1] <= r.refit_error[0]  # held-out error after <= before (or vetoed: equal)
    assert report.params_active == report.params_total  # nothing routed: every kept weight is active
    with torch.no_grad():
        expected = model(ids).logits
    moecarve.save(model, tmp_path / "static", report=report)
    with torch.no_grad():
        torch.testing.assert_close(moecarve.load(tmp_path / "static")(ids).logits, expected, atol=1e-6, rtol=1e-6)



def test_weighted_shadow_scores_are_the_plain_ones_times_each_neurons_weight():
    """score_weight folds w_i into the up row's scale: with single-neuron experts each expert's score
    is w_i |act(g~) u~| exactly, and requantize (after the experts change) folds it again."""
    from moecarve.carving.methods import score_weights
    from moecarve.modules.moe import requantize_shadows

    ffn = random_ffn(d=32, inter=64, seed=5)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(6))
    plain, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A16E64", score_weight="none", selection="topk"))
    weighted, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A16E64", score_weight="down", selection="topk"))
    assert weighted.spec.shadow_weighted and not plain.spec.shadow_weighted
    w = score_weights(ffn, "down")
    torch.testing.assert_close(w, ffn.down.norm(dim=0) / ffn.down.norm(dim=0).mean())
    assert plain.router.out_weight is None
    with torch.no_grad():  # out_weight [E, 1]: each expert's neuron's weight, in the grouping's order
        torch.testing.assert_close(weighted.router.logits(x), plain.router.logits(x) * weighted.router.out_weight[:, 0])
        requantize_shadows(torch.nn.ModuleList([weighted, plain]))  # both from their experts' rows again
        torch.testing.assert_close(weighted.router.row_scale[:, 0], plain.router.row_scale[:, 0])  # gate rows
        torch.testing.assert_close(weighted.router.row_scale[:, 1], plain.router.row_scale[:, 1] * weighted.router.out_weight[:, 0])


def test_the_shadow_bias_cancels_the_rounding_errors_mean_on_the_calibration_inputs():
    """Inputs with a large mean in a few dimensions (as transformer residual streams have) give the
    4-bit rows' estimates a systematic error; shadow_bias adds (w - w~) . mean(x) per row, which
    cancels it on the calibration inputs, and requantize computes it again for new codes."""
    from moecarve.modules.moe import quantize_tokens, requantize_shadows

    ffn = random_ffn(d=32, inter=64, seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(400, 32, generator=g)
    x[:, :3] += torch.tensor([8.0, -6.0, 5.0])  # the massive dimensions
    cfg = dict(score_weight="none", selection="topk")  # unweighted: the bias is in the rows' own units
    on, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A16E64", **cfg))
    off, _ = carve_ffn(ffn, x, CarveConfig.from_string("S0A16E64", shadow_bias=False, **cfg))
    assert on.spec.shadow_bias and not off.spec.shadow_bias and off.router.in_bias is None

    def estimate_error(moe) -> torch.Tensor:  # [T, E * 2m] the shadow's pre-activations minus the exact ones
        r = moe.router
        rows = moe.experts.in_proj.reshape(-1, 32).float()  # [E * 2m, d] in the router's row order
        q, s = quantize_tokens(x)
        est = (q.float() * s) @ (r.code_matrix().float() * r.row_scale.reshape(-1, 1)).t()
        if r.in_bias is not None:
            est = est + r.in_bias.reshape(-1)
        return est - x @ rows.t()

    with torch.no_grad():
        err_on, err_off = estimate_error(on), estimate_error(off)
        assert err_off.mean(0).abs().mean() > 0.05 * err_off.abs().mean()  # the error has a mean part
        assert err_on.mean(0).abs().mean() < 0.1 * err_off.mean(0).abs().mean()  # which the bias cancels
        assert err_on.pow(2).mean() < err_off.pow(2).mean()
        torch.testing.assert_close(on.router.input_mean, x.mean(0))
        # requantize (without the carve's clip search: other codes) computes the bias for its codes
        requantize_shadows(torch.nn.ModuleList([on]))
        r = on.router
        dequant = r.code_matrix().float() * r.row_scale.reshape(-1, 1)
        expected = (on.experts.in_proj.reshape(-1, 32).float() - dequant) @ x.mean(0)
        torch.testing.assert_close(r.in_bias.reshape(-1), expected)


def test_fisher_weights_follow_the_gradient_metric():
    from moecarve.carving.methods import score_weights

    ffn = random_ffn(d=32, inter=64, seed=7)
    fisher = torch.zeros(32)
    fisher[:4] = 1.0  # only the first four outputs matter to the loss
    w = score_weights(ffn, "fisher", fisher)
    expected = ffn.down[:4].norm(dim=0)
    torch.testing.assert_close(w, expected / expected.mean())
    torch.testing.assert_close(score_weights(ffn, "fisher", None), score_weights(ffn, "down"))  # no pass: the plain norms
    assert score_weights(ffn, "none") is None


def test_clipped_row_quantisation_is_never_worse_than_the_absmax_one():
    """With the inputs' mean squares the clip minimises the dot product's expected error: never
    worse than the row's max, better on gaussian rows, and it keeps a weight on a large input."""
    from moecarve.modules.moe import quantize_rows

    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(8))
    flat = torch.ones(64)
    codes, scale = quantize_rows(w, 4, flat)
    assert codes.abs().max() <= 7
    absmax_codes, absmax = quantize_rows(w, 4)  # no importance: the max, as before clipping existed
    torch.testing.assert_close(absmax, w.abs().amax(1) / 7)

    def err(c, s, imp):
        return ((c.float() * s.unsqueeze(1) - w).pow(2) * imp).sum(1)

    e, e0 = err(codes, scale, flat), err(absmax_codes, absmax, flat)
    assert (e <= e0 + 1e-6).all() and e.mean() < 0.95 * e0.mean()  # 13% lower here
    # an input dimension 100x larger than the rest: the rows whose max sits on it keep it exact
    loud = torch.ones(64)
    j = w.abs().argmax(1)
    loud[j[0]] = 1e4
    c2, s2 = quantize_rows(w, 4, loud)
    torch.testing.assert_close(s2[0], absmax[0])
    assert (err(c2, s2, loud) <= err(absmax_codes, absmax, loud) + 1e-3).all()
    codes8, scale8 = quantize_rows(w, 8, flat)  # 8 bits: the plain max
    torch.testing.assert_close(scale8, w.abs().amax(1) / 127)


def test_the_carve_measures_the_fisher_metric_in_memory():
    from moecarve.carve import ffn_fisher

    model = tiny_model("llama")
    windows = random_windows(2, 32)
    fisher = ffn_fisher(model, windows)
    assert len(fisher) == model.config.num_hidden_layers
    assert all(f.shape == (model.config.hidden_size,) and (f > 0).all() for f in fisher)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients left behind
    report = carve(model, CarveConfig.from_string("S0A32E128"), windows, device="cpu", progress=False)
    assert report.config.score_weight == "fisher" and report.fisher_seconds > 0
    assert all(m.spec.shadow_weighted for m in model.modules() if type(m).__name__ == "CarvedMoE")
