"""``csgd_cli.core.kmeans`` on its own: distances, inertia, k-means++, Lloyd steps and the
budget rules (projection, best of N_INIT) on tiny matrices with known answers."""

from __future__ import annotations

import pytest
import torch

from csgd_cli.core import kmeans as km


def _blobs(sizes: list[int], d: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Rows around far-apart centres (spread 0.1, centres ~50 apart), shuffled: the
    clusters any k-means must find, and each row's true blob."""
    g = torch.Generator().manual_seed(seed)
    centres = 50 * torch.randn(len(sizes), d, generator=g)
    truth = [b for b, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(truth), generator=g).tolist()
    truth = [truth[i] for i in perm]
    x = centres[truth] + 0.1 * torch.randn(len(truth), d, generator=g)
    return x, truth


def _partition(labels: torch.Tensor | list[int]) -> set[frozenset[int]]:
    """The clusters as sets of row indices (label numbering does not matter)."""
    out: dict[int, set[int]] = {}
    for i, lab in enumerate(torch.as_tensor(labels).tolist()):
        out.setdefault(lab, set()).add(i)
    return {frozenset(c) for c in out.values()}


def test_squared_distances_match_cdist_and_are_never_negative() -> None:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g)
    c = c.double()
    d = km._sq_dist(x, x.pow(2).sum(1), c)
    assert d.shape == (10, 3)
    assert torch.allclose(d, torch.cdist(x, c).pow(2))
    # large equal rows: the expansion rounds around 0; the clamp keeps it at or above 0
    big = 1e4 + torch.randn(50, 8, generator=g)
    d = km._sq_dist(big, big.pow(2).sum(1), big)
    assert float(d.min()) >= 0.0


def test_inertia_by_hand() -> None:
    x = torch.tensor([[0, 0], [2, 0], [10, 10], [10, 12]])  # ints are accepted
    # centres (1, 0) and (10, 11): each row 1 away from its centre
    assert km.inertia(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(4.0)
    # (0,0),(10,10) around (5,5): 50 + 50; (2,0),(10,12) around (6,6): 52 + 52
    assert km.inertia(x, torch.tensor([0, 1, 0, 1])) == pytest.approx(204.0)
    assert km.inertia(x, torch.arange(4)) == 0.0  # singletons sit on their centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_well_separated_blobs_are_found_exactly(seed: int) -> None:
    x, truth = _blobs([5, 3, 7], d=6, seed=seed)
    labels = km.kmeans(x, 3, seed=seed)
    assert labels.dtype == torch.int64 and labels.shape == (15,)
    assert _partition(labels) == _partition(truth)


def test_every_label_is_used_on_distinct_rows() -> None:
    """Rows all different: each of the k labels holds at least one row, for every k."""
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    for k in range(1, 13):
        assert sorted(set(km.kmeans(x, k, 0).tolist())) == list(range(k)), k
    assert km.kmeans(x, 1, 0).tolist() == [0] * 12
    assert sorted(km.kmeans(x, 12, 0).tolist()) == list(range(12))  # a row per cluster


def test_same_seed_same_labels_whatever_the_input_dtype() -> None:
    """Rows are clustered in float32 whatever they come in; gradients are not tracked."""
    x, _ = _blobs([20, 20, 20, 20], d=10, seed=3)
    x = x + torch.randn(80, 10, generator=torch.Generator().manual_seed(1)) * 30  # overlap
    a = km.kmeans(x, 9, seed=7)
    assert torch.equal(a, km.kmeans(x, 9, seed=7))
    assert torch.equal(a, km.kmeans(x.double(), 9, seed=7))
    assert torch.equal(a, km.kmeans(x.clone().requires_grad_(), 9, seed=7))
    assert any(not torch.equal(a, km.kmeans(x, 9, seed=s)) for s in (8, 9, 10))


def test_lloyd_moves_a_misplaced_row_and_stops_at_a_fixed_point() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    # centres 0 and 22/3: row 1 is nearer 0 and moves; then centres 0.5, 10.5 hold
    out = km._lloyd(x, torch.tensor([0, 1, 1, 1]), 2, iters=10)
    assert out.tolist() == [0, 0, 1, 1]
    assert torch.equal(km._lloyd(x, out, 2, iters=10), out)
    # one step only: the move, nothing more
    assert km._lloyd(x, torch.tensor([0, 1, 1, 1]), 2, iters=1).tolist() == [0, 0, 1, 1]


def test_lloyd_refills_empty_clusters_with_the_worst_fitted_rows() -> None:
    """Clusters 1 and 2 start empty, their centres (0) far from every row: after one
    step, the two rows farthest from the one centre (200, then 100) take them in that
    order; the end is an optimum with every cluster used (inertia 0.5)."""
    x = torch.tensor([[100.0], [101.0], [102.0], [200.0]])
    start = torch.zeros(4, dtype=torch.int64)
    assert km._lloyd(x, start, 3, iters=1).tolist() == [2, 0, 0, 1]
    out = km._lloyd(x, start, 3, iters=10)
    assert _partition(out) == {frozenset({0}), frozenset({1, 2}), frozenset({3})}
    assert km.inertia(x, out) == pytest.approx(0.5)


def test_plus_plus_picks_distinct_rows_and_keeps_the_thread_count() -> None:
    """Duplicates: the first picks are one of each distinct row (a row on a centre has
    weight 0); past them, unused rows; the caller's thread count is restored."""
    rows = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 7.0]])
    x = rows.repeat_interleave(4, 0)  # 12 rows, 3 distinct
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        idx = km._plus_plus(x, 5, torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    picks = idx.tolist()
    assert len(picks) == 5 and len(set(picks)) == 5
    assert {i // 4 for i in picks[:3]} == {0, 1, 2}


def _spy_lloyd(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, torch.Tensor]]:
    """Record (row length, iters, result) of every Lloyd run."""
    calls: list[tuple[int, int, torch.Tensor]] = []
    real = km._lloyd

    def spy(x: torch.Tensor, labels: torch.Tensor, k: int, iters: int) -> torch.Tensor:
        out = real(x, labels, k, iters)
        calls.append((x.shape[1], iters, out))
        return out

    monkeypatch.setattr(km, "_lloyd", spy)
    return calls


def test_small_problems_run_on_the_exact_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_lloyd(monkeypatch)
    x, _ = _blobs([4, 4], d=40)
    km.kmeans(x, 2, 0, proj_dim=8)  # 40 > 8, but far under EXACT_BUDGET
    assert [c[:2] for c in calls] == [(40, km.MAX_ITERS)] * km.N_INIT


def test_over_the_budget_rows_are_projected_then_refined_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over EXACT_BUDGET: k-means on ``proj_dim`` projected values, then as many exact
    Lloyd steps as the budget buys (none when it buys none); blobs survive the projection."""
    calls = _spy_lloyd(monkeypatch)
    x, truth = _blobs([6, 5, 7], d=64, seed=1)
    n, k, d = 18, 3, 64
    monkeypatch.setattr(km, "EXACT_BUDGET", 5.0 * n * k * d)  # buys 5 exact steps
    lab = km.kmeans(x, k, 0, proj_dim=4)
    assert [c[:2] for c in calls] == [(4, km.MAX_ITERS)] * km.N_INIT + [(64, 5)]
    assert _partition(lab) == _partition(truth)
    calls.clear()
    monkeypatch.setattr(km, "EXACT_BUDGET", 1.0)  # buys none: the projected labels stay
    lab = km.kmeans(x, k, 0, proj_dim=4)
    assert [c[:2] for c in calls] == [(4, km.MAX_ITERS)] * km.N_INIT
    assert _partition(lab) == _partition(truth)
    # a row no longer than proj_dim is never projected, whatever the budget
    calls.clear()
    km.kmeans(x[:, :4], k, 0, proj_dim=4)
    assert {c[0] for c in calls} == {4} and len(calls) == km.N_INIT


def test_the_best_of_n_init_runs_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_lloyd(monkeypatch)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(5))
    lab = km.kmeans(x, 6, 0)
    costs = [km.inertia(x, out) for _, _, out in calls]
    assert len(costs) == km.N_INIT
    assert km.inertia(x, lab) == pytest.approx(min(costs))
    calls.clear()
    monkeypatch.setattr(km, "SMALL", 40 * 6 - 1)  # n * k over SMALL: one run only
    km.kmeans(x, 6, 0)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_labels_come_back_on_the_inputs_device() -> None:
    x, truth = _blobs([5, 6], d=8)
    on_cpu = km.kmeans(x, 2, 0)  # clustered on the GPU, returned to the CPU
    assert on_cpu.device.type == "cpu" and _partition(on_cpu) == _partition(truth)
    on_gpu = km.kmeans(x.cuda(), 2, 0)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)
