"""k-means in torch (``core.kmeans``, issue 22.9): seeded, every row in one of k
non-empty clusters, inertia as good as scikit-learn's, the projected path refined to a
fixed point of exact k-means where that is affordable, and whole zoo networks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision

from csgd_cli.core import kmeans as km
from csgd_cli.core.clustering import cluster_groups, kmeans_clusters, num_clusters, target_widths
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup, check_clusters
from csgd_cli.tracing.trace import channel_groups


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows like a layer's kernels: a few directions plus noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.5 * torch.randn(
        n, d, generator=g
    )


def _sklearn_inertia(x: torch.Tensor, k: int) -> float:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(x.double().numpy())
    return km.inertia(x, torch.from_numpy(lab))


def test_same_seed_same_clusters_other_seed_other_clusters() -> None:
    x = _data(96, 300)
    a = kmeans_clusters(x, 40, seed=3)
    assert a == kmeans_clusters(x, 40, seed=3)
    assert any(kmeans_clusters(x, 40, seed=s) != a for s in (4, 5, 6))
    assert sorted(i for c in a for i in c) == list(range(96)) and len(a) == 40


@pytest.mark.parametrize(("n", "d", "k"), [(64, 144, 40), (128, 1152, 80), (256, 2304, 160)])
def test_inertia_is_as_good_as_scikit_learns(n: int, d: int, k: int) -> None:
    x = _data(n, d)
    ours = km.inertia(x, km.kmeans(x, k, 0))
    assert ours <= 1.05 * _sklearn_inertia(x, k)


def test_projected_path_ends_at_a_fixed_point_of_exact_kmeans() -> None:
    """Rows longer than PROJ_DIM are clustered on a projection, then refined on the
    exact rows: one more exact Lloyd step moves nothing."""
    x, k = _data(900, 16 * km.PROJ_DIM), 450
    assert 900 * k * x.shape[1] * 20 > km.EXACT_BUDGET  # so the projection is used
    lab = km.kmeans(x, k, 0)
    assert torch.equal(km._lloyd(x.float(), lab, k, 1), lab)
    assert len(torch.unique(lab)) == k


def test_duplicate_rows_give_k_clusters() -> None:
    """A converged model: many identical kernels; every cluster still gets a row."""
    x = torch.randn(4, 50).repeat_interleave(8, 0)
    cl = kmeans_clusters(x, 10, 0)
    assert len(cl) == 10 and sorted(i for c in cl for i in c) == list(range(32))
    four = kmeans_clusters(x, 4, 0)  # the duplicates found exactly
    assert sorted(map(tuple, four)) == [tuple(range(i, i + 8)) for i in range(0, 32, 8)]


def test_a_vgg_classifier_group_clusters_with_the_projection() -> None:
    """The issue's shape, smaller: a wide Linear group with 25,088-dim rows goes through
    the projection (assignment checked against exact distances by inertia)."""
    x = _data(512, 25088, seed=1)
    lab = km.kmeans(x, 320, 0)
    assert len(torch.unique(lab)) == 320
    exact = km.inertia(x, km._lloyd(x, lab, 320, 50))  # exact Lloyd from ours
    assert km.inertia(x, lab) <= 1.02 * exact


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mobilenet_v3_small"])
def test_whole_zoo_networks_cluster_into_valid_clusters(name: str) -> None:
    """Networks of our choice not named in the issue: every group clustered, the
    clusters valid for the merge, the same twice."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    groups = [g for g in channel_groups(model, torch.randn(1, 3, 64, 64)) if g.excluded is None]
    ks = target_widths(groups, 0.5)
    a = cluster_groups(model, groups, ks, "kmeans", 0)
    check_clusters(groups, a)
    assert {k: len(v) for k, v in a.items()} == ks
    assert a == cluster_groups(model, groups, ks, "kmeans", 0)


def test_labels_are_a_partition_for_random_sizes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, d = int(rng.integers(5, 80)), int(rng.integers(1, 600))
        k = int(rng.integers(1, n + 1))
        lab = km.kmeans(torch.from_numpy(rng.normal(size=(n, d))), k, 0)
        assert lab.shape == (n,) and int(lab.min()) >= 0 and int(lab.max()) < k


def test_round_to_widths() -> None:
    assert [num_clusters(w, 0.625, 16) for w in (16, 32, 64)] == [16, 16, 32]  # 40: a tie
    assert [num_clusters(w, 0.625, 8) for w in (16, 32, 64)] == [8, 16, 40]  # 20: a tie
    assert num_clusters(64, 0.7, 16) == 48 and num_clusters(256, 0.7, 16) == 176
    assert num_clusters(8, 0.5, 16) == 8  # narrower than the block: stays whole
    assert num_clusters(20, 0.9, 16) == 16  # never above the width, a multiple when it can
    assert num_clusters(64, 0.05, 16) == 16  # at least one block
    model = get_model("resnet56")
    groups = channel_groups(model)
    thin = target_widths(groups, 0.5, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 for w in thin.values())
    # an iterative round on a thinned model keeps the multiple and never grows a group
    shrunk = [ChannelGroup(g.name, thin[g.name], g.members) for g in groups]
    again = target_widths(shrunk, 0.25, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 and w <= thin[k] for k, w in again.items())
