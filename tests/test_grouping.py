"""Shared split and the exact balanced assignment."""

import numpy as np
import pytest
import scipy.optimize
import torch

from moecarve.carving.grouping import balanced_assignment, balanced_kmeans, group_neurons, l1_to_centroids


@pytest.mark.parametrize("n,k", [(12, 3), (40, 4), (60, 6), (64, 8), (96, 12)])
@pytest.mark.parametrize("integer", [True, False])
def test_balanced_assignment_matches_expanded_lap(n, k, integer):
    rng = np.random.default_rng(n * k + integer)
    for _ in range(3):
        cost = rng.integers(0, 20, size=(n, k)).astype(float) if integer else rng.random((n, k))
        labels = balanced_assignment(cost, n // k).numpy()
        assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
        ours = cost[np.arange(n), labels].sum()
        expanded = np.repeat(cost, n // k, axis=1)  # the reference code's n x n matrix
        r, c = scipy.optimize.linear_sum_assignment(expanded)
        assert ours == pytest.approx(expanded[r, c].sum(), abs=1e-9)


def test_balanced_assignment_rejects_bad_shape():
    with pytest.raises(ValueError, match="n == k"):
        balanced_assignment(np.zeros((10, 3)), 3)


def test_l1_to_centroids_equals_cdist():
    g = torch.Generator().manual_seed(0)
    markers = torch.rand(50, 30, generator=g) < 0.2
    centroids = torch.rand(50, 4, generator=g)
    ref = torch.cdist(markers.float().t(), centroids.t(), p=1)
    torch.testing.assert_close(l1_to_centroids(markers, centroids), ref, rtol=1e-5, atol=1e-4)


def test_group_neurons_partitions_exactly():
    g = torch.Generator().manual_seed(1)
    markers = torch.rand(200, 64, generator=g) < 0.15
    rates = markers.float().mean(0)
    grouping = group_neurons(markers, rates, n_shared=2, n_routed=6, iters=3)
    assert grouping.shared.shape == (16,) and grouping.experts.shape == (6, 8)
    every = torch.cat([grouping.shared, grouping.experts.reshape(-1)]).sort().values
    assert torch.equal(every, torch.arange(64))  # each neuron in exactly one expert
    # the shared neurons are the most active ones
    assert rates[grouping.shared].min() >= rates[grouping.experts.reshape(-1)].max()
    # every representative belongs to its own group
    for j, r in enumerate(grouping.representatives.tolist()):
        assert r in grouping.experts[j].tolist()


def test_kmeans_iterations_do_not_increase_cost():
    g = torch.Generator().manual_seed(2)
    markers = torch.rand(300, 48, generator=g) < 0.2
    rates = markers.float().mean(0)

    def cost(labels, k=4):
        cents = torch.stack([markers[:, labels == j].float().mean(1) for j in range(k)], 1)
        return l1_to_centroids(markers, cents).gather(1, labels.view(-1, 1)).sum().item()

    one, _ = balanced_kmeans(markers, rates, 4, iters=1)
    five, _ = balanced_kmeans(markers, rates, 4, iters=5)
    assert cost(five) <= cost(one) + 1e-3
