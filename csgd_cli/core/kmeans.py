"""Seeded k-means over the rows of a matrix, in torch (on the GPU when there is one).

Why not scikit-learn: its greedy k-means++ reads the whole matrix once per centre, so a
VGG classifier group (4096 rows of 25,088 values, k = 2560) spends minutes in the
initialisation alone. Here:

* where k-means++ and ~20 Lloyd steps on the exact rows would cost more than
  ``EXACT_BUDGET`` multiply-adds, rows longer than ``PROJ_DIM`` are first mapped by a
  seeded Gaussian random projection to ``PROJ_DIM`` values (Johnson-Lindenstrauss:
  squared distances kept within a few per cent) for k-means++ and Lloyd's first steps;
* greedy k-means++ (``2 + ln k`` candidates per centre, as scikit-learn does) keeps each
  row's distance to its nearest centre, so each new centre costs one pass over the
  (projected) rows, not over all centres;
* Lloyd iterations are one matrix product per step until no row moves; then Lloyd
  steps on the exact rows follow while they stay under ``EXACT_BUDGET`` multiply-adds,
  so the assignment is a fixed point of exact k-means whenever that is affordable
  (every conv group of the zoos; a 4096 x 25,088 classifier group keeps the projected
  assignment, its inertia printed against scikit-learn's by
  ``scripts/bench_clustering.py``).

Every random draw comes from a CPU ``torch.Generator`` seeded with ``seed``: the same
seed gives the same clusters on a given device.
"""

from __future__ import annotations

import math

import torch

PROJ_DIM = 256  # projected row length (JL: distortion ~ sqrt(8 ln n / PROJ_DIM))
EXACT_BUDGET = 2e10  # multiply-adds of exact Lloyd steps allowed (~1 s on 2 cores)
MAX_ITERS = 100
N_INIT, SMALL = 3, 2**19  # best of N_INIT runs when n * k is at most SMALL


def _device(x: torch.Tensor) -> torch.device:
    if x.is_cuda:
        return x.device
    return torch.device("cuda") if torch.cuda.is_available() else x.device


def _sq_dist(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared distances; clamped at 0 (the expansion rounds below it)."""
    return (x2[:, None] - 2 * (x @ c.T) + c.pow(2).sum(1)[None]).clamp_min_(0)


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ centres (row indices of ``x``): ``k`` small sequential steps, on
    one CPU thread (threads only wait on each other over such small products)."""
    if x.is_cuda:
        return _plus_plus_steps(x, k, gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _plus_plus_steps(x, k, gen)
    finally:
        torch.set_num_threads(threads)


def _plus_plus_steps(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x2 = x.pow(2).sum(1)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = _sq_dist(x, x2, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if float(total) <= 0:  # every row sits on a centre (duplicates): take unused ones
            used = set(chosen)
            chosen.append(next(i for i in range(n) if i not in used))
            continue
        cum = closest.double().cumsum(0)
        u = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * cum[-1]
        cand = torch.searchsorted(cum, u).clamp_(max=n - 1)
        d = torch.minimum(closest[:, None], _sq_dist(x, x2, x[cand]))  # (n, trials)
        best = int(d.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = d[:, best].contiguous()
    return torch.tensor(chosen, device=x.device)


def _lloyd(x: torch.Tensor, labels: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Lloyd steps from ``labels`` until no row moves (under 0.1 % of them, in a group
    over 1000 wide); an emptied cluster takes the row farthest from its centre."""
    x2 = x.pow(2).sum(1)
    ones = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        cnt = torch.zeros(k, device=x.device, dtype=x.dtype).index_add_(0, labels, ones)
        cen = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype)
        cen.index_add_(0, labels, x).div_(cnt.clamp_min(1)[:, None])
        d = _sq_dist(x, x2, cen)
        new = d.argmin(1)
        empty = torch.nonzero(torch.bincount(new, minlength=k) == 0).flatten()
        if len(empty):  # seldom: refill from the worst-fitted rows
            far = d.gather(1, new[:, None])[:, 0].argsort(descending=True)[: len(empty)]
            new[far] = empty[: len(far)]
        moved = int((new != labels).sum())
        labels = new
        if moved <= x.shape[0] // 1000:  # none, or under 0.1 % of a wide group's rows
            break
    return labels


def kmeans(x: torch.Tensor, k: int, seed: int = 0, proj_dim: int = PROJ_DIM) -> torch.Tensor:
    """Cluster label (0..k-1) of each row of ``x`` (n, d); ``k <= n``. Labels come back
    on ``x``'s device."""
    n, dim = x.shape
    dev = _device(x)
    gen = torch.Generator().manual_seed(seed)
    full = x.detach().to(dev, torch.float32)
    work = full
    exact_run = float(n) * k * dim * (2 + math.log(k) + 20)  # k-means++ and ~20 steps
    if dim > proj_dim and exact_run > EXACT_BUDGET:  # then on projected rows first
        proj = torch.randn(dim, proj_dim, generator=gen) / math.sqrt(proj_dim)
        work = full @ proj.to(dev)
    best, best_cost = None, math.inf
    for _ in range(N_INIT if n * k <= SMALL else 1):  # cheap problems: best of N_INIT
        centres = _plus_plus(work, k, gen)
        labels = _sq_dist(work, work.pow(2).sum(1), work[centres]).argmin(1)
        labels = _lloyd(work, labels, k, MAX_ITERS)
        cost = inertia(work, labels)
        if cost < best_cost:
            best, best_cost = labels, cost
    assert best is not None
    if work is not full:  # exact Lloyd steps while they are affordable
        steps = min(MAX_ITERS, int(EXACT_BUDGET // (float(n) * k * dim)))
        if steps:
            best = _lloyd(full, best, k, steps)
    return best.to(x.device)


def inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the rows to their cluster means (k-means' objective)."""
    x = x.double()
    k = int(labels.max()) + 1
    cnt = torch.bincount(labels, minlength=k).clamp_min(1).double()
    cen = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    cen /= cnt[:, None]
    return float((x - cen[labels]).pow(2).sum())
