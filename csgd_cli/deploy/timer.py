"""The one timer behind every latency figure (``csgd eval``, ``csgd run``'s table, a
latency target's search).

Other work on a shared machine only ever adds time, and load that comes and goes hits
whatever runs at that moment. So variants are timed side by side: each is warmed up,
then every round times each variant in turn (the order rotating, so none always runs
after the same neighbour) for a block of calls, and keeps the block's fastest call.
Per variant:

- ``ms``: the fastest block over the rounds (the least disturbed figure);
- ``ratios``: to the first variant, the median over rounds of the two blocks' ratio in
  the same round (a burst of load hits both, or one round only);
- ``spread``: half the interquartile range of those per-round ratios, the figure two
  equal networks' ratio (1.00) is read within (None under three rounds).

``cpu=True`` (a network run on one CPU thread) reads the process's CPU time instead of
the wall clock: on a machine shared with other work, the time a call spends waiting for
a core is not the network's (at load 19 on 2 cores, two equal ResNet-56 read 1.07x
+-0.12 by the wall clock, 1.00x +-0.05 by CPU time). Several threads, or a GPU, are
timed by the wall clock: their CPU time is not their latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ROUNDS = 7  # rounds of a comparison
BLOCK_S = 0.05  # least time per variant per round
MIN_CALLS = 2  # least calls per variant per round (the fastest is kept)
MAX_CALLS = 400  # most calls per block (a very fast layer)
WARMUP = 2  # untimed calls per variant first (allocations, prepacked weights, compiling)


@dataclass(frozen=True)
class Timed:
    """Result of ``interleaved``: per variant, its time (ms), its ratio to the first
    variant and that ratio's spread (half the interquartile range over rounds)."""

    ms: tuple[float, ...]
    ratios: tuple[float, ...]
    spread: tuple[float | None, ...]
    rounds: int
    clock: str  # "cpu" (the process's CPU time) or "wall"


def _spread(v: Sequence[float]) -> float | None:
    """Half the interquartile range (None: too few rounds to say)."""
    if len(v) < 3:
        return None
    q = statistics.quantiles(v, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def _block(call: Callable[[], Any], budget_s: float, min_calls: int, cpu: bool) -> float:
    """Fastest of at least ``min_calls`` calls and ``budget_s`` seconds (s) of the clock."""
    clock = time.process_time if cpu else time.perf_counter
    best, n, start = float("inf"), 0, clock()
    while n < min_calls or (clock() - start < budget_s and n < MAX_CALLS):
        t0 = clock()
        call()
        best = min(best, clock() - t0)
        n += 1
    return best


def interleaved(
    calls: Sequence[Callable[[], Any]],
    rounds: int | None = None,
    block_s: float | None = None,
    min_calls: int | None = None,
    warmup: int | None = None,
    cpu: bool = False,
) -> Timed:
    """Time ``calls`` (each one forward, synchronised) side by side; see the module.
    ``None`` takes the module's setting (read at call time, so a benchmark or a test can
    shorten every timing at once)."""
    if not calls:
        raise ValueError("nothing to time")
    rounds = max(1, ROUNDS if rounds is None else rounds)
    block_s = BLOCK_S if block_s is None else block_s
    min_calls = max(1, MIN_CALLS if min_calls is None else min_calls)
    for call in calls:
        for _ in range(WARMUP if warmup is None else warmup):
            call()
    n = len(calls)
    per: list[list[float]] = [[0.0] * rounds for _ in calls]
    for r in range(rounds):
        for j in range(n):
            i = (j + r) % n  # rotate the order: no variant always follows the same one
            per[i][r] = _block(calls[i], block_s, min_calls, cpu)
    ratios, spread = [], []
    for ts in per:
        rs = [t / max(b, 1e-12) for t, b in zip(ts, per[0], strict=True)]
        ratios.append(statistics.median(rs))
        spread.append(_spread(rs))
    ms = tuple(min(ts) * 1e3 for ts in per)
    return Timed(ms, tuple(ratios), tuple(spread), rounds, "cpu" if cpu else "wall")


def time_one(call: Callable[[], Any], **kw: Any) -> float:
    """One variant's time (ms): ``interleaved`` with nothing beside it."""
    return interleaved([call], **kw).ms[0]
