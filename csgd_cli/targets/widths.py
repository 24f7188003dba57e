"""Per-group widths for a target: a fraction of the base's multiply-adds, parameters or
measured latency (``prune.target=flops:0.45``).

A target kind is one entry of ``TARGETS``: how its cost is counted (``costs``), the
width step its candidates take, and whether a choice is confirmed by timing. A rule is
one entry of ``RULES``: ``distortion`` (default) or ``uniform``.

``distortion`` (C-SGD's own signal): merging a group into ``k`` clusters moves every
filter to its cluster's centre, so the k-means distortion at ``k`` (the squared distance
the centripetal pull must cover, on the joint kernels of the group's producers, each
producer scaled to unit norm) says what a width costs the network. It is read for every
``k`` at once from Ward's agglomerative clustering (each merge adds its rise in
within-cluster squares). Greedily, the width step with the least distortion added per
unit of cost saved is taken until the target is met; then steps are given back, the most
distortion removed per unit of cost first, while the target still holds (that lands a
count target within a fraction of a percent below it).

``uniform``: one fraction of the original width for every group (bisection), then the
same give-back, the narrowest group (relative to its original width) first.

What a choice works on, the target kinds and the candidate widths: ``targets.problem``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..common.errors import CsgdError
from ..common.nets import count_macs
from ..common.target import Target
from ..core.clustering import distortion_curve
from ..deploy.latency import WHOLE_NETWORK, Runtime, Timings
from .costs import TermCost, descend, give_back
from .problem import (
    TARGETS,
    Problem,
    Widths,
    measured_ratio,
    name_of,
    reach,
    setup,
    thin_at,
    unreachable,
    width_key,
)
from .resolution import resolution_of
from .timed import CALIBRATE, CONFIRMS, TimedChoice, choose_timed, floor_note, near_floor

log = logging.getLogger("csgd")
LADDER = 48  # most width steps a group takes in the greedy descent (all, giving back)


def _ladder(cands: list[int]) -> list[int]:
    n = len(cands)  # the current width (last) is always a rung
    return (
        cands
        if n <= LADDER
        else sorted({cands[round(i * (n - 1) / (LADDER - 1))] for i in range(LADDER)})
    )


@dataclass(frozen=True)
class Search:
    """What a rule searches: the problem, the target's cost over the allowed groups'
    widths, their candidate widths, the seed, and every group's width before any round
    (``base``)."""

    problem: Problem
    cost: TermCost
    cands: dict[str, list[int]]
    seed: int
    base: Widths


# -- rules: widths within a budget --------------------------------------------------------------
def _distortion_rule(s: Search, budget: float) -> Widths:
    problem, cost, cands = s.problem, s.cost, s.cands
    if problem.curves is None:
        by_name = {g.name: g for g in problem.groups}
        problem.curves = {
            n: distortion_curve(problem.model, by_name[n], s.seed) for n in problem.names
        }
    curves = problem.curves
    ks = {g: c[-1] for g, c in cands.items()}
    descend(cost, ks, {g: _ladder(c) for g, c in cands.items()}, budget, lambda g, k: curves[g](k))
    give_back(
        cost,
        ks,
        cands,
        budget,
        lambda g, k, k2, d: (curves[g](k) - curves[g](k2)) / d if d > 0 else float("inf"),
    )
    return ks


def _uniform_rule(s: Search, budget: float) -> Widths:
    cost, cands, base = s.cost, s.cands, s.base

    def at(r: float) -> Widths:  # the candidate nearest r x original width (ties down)
        return {g: min(c, key=lambda k: (abs(k - r * base[g]), k)) for g, c in cands.items()}

    lo, hi = 0.0, 1.0
    for _ in range(40):  # the largest fraction that meets the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.cost(at(mid)) <= budget else (lo, mid)
    ks = at(lo)
    give_back(cost, ks, cands, budget, lambda g, k, k2, d: -k / base[g])
    return ks


Rule = Callable[[Search, float], Widths]  # a rule: the widths it picks within a budget
RULES: dict[str, Rule] = {"distortion": _distortion_rule, "uniform": _uniform_rule}


@dataclass
class Choice:
    widths: Widths  # the groups allowed to shrink, at their chosen widths
    report: dict[str, Any]


def check_reachable(problem: Problem, target: Target, base_cost: float | None = None) -> None:
    """Refuse a target below what the allowed groups can reach (one line, the floor)."""
    cost, cands = setup(problem, target)
    _, floor = reach(problem, target, cost, cands, base_cost)
    if floor > target.value:
        raise unreachable(target, floor, problem)


def choose(
    problem: Problem,
    target: Target,
    rule: str = "distortion",
    seed: int = 0,
    base_widths: Widths | None = None,
    base_cost: float | None = None,
) -> Choice:
    """Widths of the allowed groups meeting ``target`` (a fraction of ``base_cost``:
    default the model's own cost; iterative rounds pass the first round's base)."""
    t0 = time.perf_counter()
    if rule not in RULES:
        raise CsgdError(f"rule={rule} is unknown", f"pass rule=<{'|'.join(RULES)}>")
    cost, cands = setup(problem, target)
    base = {g.name: (base_widths or {}).get(g.name, g.width) for g in problem.groups}
    now, floor = reach(problem, target, cost, cands, base_cost)
    if floor > target.value:
        raise unreachable(target, floor, problem)
    budget = target.value * (base_cost or now)  # absolute: MACs, parameters or ms
    search = Search(problem, cost, cands, seed, base)
    ks, reached, timed = _pick(search, target, RULES[rule], budget, now, floor * (base_cost or now))
    report = _report(search, target, rule, ks, reached, now, base_cost or now, timed)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return Choice(ks, report)


def _pick(
    s: Search, target: Target, pick: Rule, budget: float, now: float, floor: float
) -> tuple[Widths, float, TimedChoice | None]:
    """The rule's widths within ``budget`` (``floor``: the narrowest's absolute cost), what
    they reach, and the timed search behind a latency choice."""
    problem, cost, cands, count = s.problem, s.cost, s.cands, TARGETS[target.kind].count
    if budget >= now:  # an iterative round that is there already
        return {n: c[-1] for n, c in cands.items()}, now, None
    if count is None:
        timed = _choose_timed(s, budget / now, floor / now, pick)
        return timed.widths, timed.ratio * now, timed
    ks = pick(s, budget)
    reached = cost.cost(ks) if cost.exact else count(thin_at(problem, ks), problem.x)
    for _ in range(3):  # exact for every layer a rule knows; should another layer's
        if reached <= budget:  # cost change too, shrink by the gap
            break
        ks = pick(s, 2 * budget - reached)
        reached = count(thin_at(problem, ks), problem.x)
    return ks, reached, None


def _report(
    s: Search,
    target: Target,
    rule: str,
    ks: Widths,
    reached: float,
    now: float,
    base: float,
    timed: TimedChoice | None,
) -> dict[str, Any]:
    """What a choice says: the target, the costs, the widths before and after, the timed
    networks of a latency choice and the timings' runtime."""
    problem = s.problem
    report: dict[str, Any] = {
        "target": target.spec,
        "kind": target.kind,
        "value": target.value,
        "rule": rule,
        "label": TARGETS[target.kind].label,
        "base": base,
        "now": now,
        "reached": reached,
        "ratio": reached / base,
        "round_to": problem.round_to,
        "min_width": problem.min_width,
        "before": {n: s.base[n] for n in problem.names},
        "widths": dict(ks),
        "resolution": resolution_of(problem.x),  # what the counts and times are per image
    }
    report["met"] = report["ratio"] <= target.value
    if timed is not None:  # a latency choice: confirmed by a re-check, or not met
        report["met"] = report["met"] and timed.confirmed
        report.update(
            confirmed=timed.confirmed,
            modelled_ratio=timed.modelled * now / base,
            calibrated=timed.calibrated,  # whole networks the model was calibrated on
            networks_timed=[[round(m / timed.timed[0][0], 4), round(r, 4)] for m, r in timed.timed],
        )  # networks_timed: (modelled time / the current's, measured ratio) per network
    if problem.notes:
        report["notes"] = list(problem.notes)
    if problem.timings is not None:
        t = problem.timings
        report.update(
            backend=t.rt.backend,
            batch=t.rt.batch,
            threads=t.rt.nthreads,
            layers_timed=len(t.data["layers"]),
            cache=str(t.path) if t.path else None,
        )
    return report


def _choose_timed(s: Search, want: float, floor: float, pick: Rule) -> TimedChoice:
    """``timed.choose_timed`` on this problem (ratios to the current network)."""
    problem = s.problem
    if near_floor(want, floor):  # say what the target costs before choosing
        _say_floor_cost(s, want, floor, pick)
    out = choose_timed(
        s.cost,
        s.cands,
        want,
        floor,
        lambda b: pick(s, b),
        lambda ks, again: measured_ratio(problem, ks, again),
        lambda ks: width_key(problem, ks),
        CONFIRMS,
        CALIBRATE if problem.runtime.backend in WHOLE_NETWORK else 0,
    )
    problem.timings.save()  # type: ignore[union-attr]
    return out


def _say_floor_cost(s: Search, want: float, floor: float, pick: Rule) -> None:
    """Log the multiply-adds a target near the floor takes and the larger batches (up to
    64) at which the floor sits lower; kept in ``problem.notes``."""
    problem, lowest = s.problem, {g: c[0] for g, c in s.cands.items()}
    anchors = [(s.cost.cost({}), 1.0), (s.cost.cost(lowest), floor)]
    (x1, y1), (x2, y2) = sorted(anchors)
    budget = x1 + (want - y1) * (x2 - x1) / (y2 - y1) if y2 != y1 else x1
    ks = pick(s, budget)
    share = count_macs(thin_at(problem, ks), problem.x) / count_macs(problem.model, problem.x)
    rt, at = problem.runtime, {}
    for b in sorted({min(64, rt.batch * 8), 64} - {rt.batch}):
        if b > rt.batch:
            t = Timings(name_of(problem), Runtime(rt.backend, b, rt.threads), problem.cache_dir)
            t.ratio(
                problem.model,
                lambda: thin_at(problem, lowest),
                width_key(problem, lowest),
                problem.shape,
            )
            t.save()
            at[b] = t.data["ratios"][width_key(problem, lowest)]
    note = floor_note(want, floor, rt.batch, share, at)
    log.warning("%s", note)
    problem.notes.append(note)
