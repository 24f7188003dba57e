"""What one width choice works on (``Problem``), the target kinds (``TARGETS``: how each
cost is counted, the width step its candidates take, whether a choice is timed), and the
pieces every rule shares: the candidates and cost of a target (``setup``), the smallest
share the allowed groups reach (``floor``), the network at given widths (``thin``).

Candidates: multiples of ``round_to`` (latency targets: of 8 when ``round_to`` is 1, the
block CPU runtimes compute channels in) from ``min_width`` up, and the group's current
width; a group narrower than ``min_width`` stays whole; a coupled group (a residual
stage) is one group, so it has one width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..common.nets import count_macs, count_params
from ..common.target import TARGET_KINDS, Target
from ..core.clustering import candidate_widths, cluster_groups
from ..core.surgery import merge
from ..deploy import latency
from ..deploy.export import BACKENDS, require_runtime
from ..deploy.latency import Runtime, Timings
from ..rules.groups import ChannelGroup
from .costs import Shapes, TermCost, latency_cost, macs_cost, params_cost

LATENCY_STEP = 8  # channels per block in onnxruntime's NCHWc and oneDNN (AVX2)
Widths = dict[str, int]


def width_share(before: Widths, after: Widths) -> float:
    """The groups of ``after``: their widths' share of their ``before`` widths."""
    return round(sum(after.values()) / max(sum(before[g] for g in after), 1), 4)


@dataclass
class Problem:
    """What one choice works on."""

    model: nn.Module
    groups: list[ChannelGroup]
    names: list[str]  # the groups allowed to shrink
    x: Any  # an example input
    round_to: int
    min_width: int
    runtime: Runtime
    cache_dir: Path | None
    timings: Timings | None = None
    curves: dict[str, Callable[[int], float]] | None = None  # distortion, once per choice
    notes: list[str] = field(default_factory=list)  # what the user should know about a choice

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass(frozen=True)
class TargetKind:
    label: str
    cost: Callable[[Problem, Shapes, dict[str, list[int]]], TermCost]
    step: Callable[[int], int]  # candidate width step for a round_to
    count: Callable[[nn.Module, Any], int] | None  # the exact count; None: timed instead

    @property
    def measured(self) -> bool:
        return self.count is None


TARGETS: dict[str, TargetKind] = {
    "flops": TargetKind(
        "multiply-adds", lambda p, s, c: macs_cost(p.model, s, p.x), int, count_macs
    ),
    "params": TargetKind(
        "parameters",
        lambda p, s, c: params_cost(p.model, s, p.x),
        int,
        lambda net, x: count_params(net),
    ),
    "latency": TargetKind(
        "latency",
        lambda p, s, c: latency_cost(p.model, s, p.x, p.timings, c),  # type: ignore[arg-type]
        lambda r: r if r > 1 else LATENCY_STEP,
        None,
    ),
}
assert tuple(TARGETS) == TARGET_KINDS  # config validates the names


def thin_at(problem: Problem, ks: Widths) -> nn.Module:
    """The network at widths ``ks`` (even clusters: the shapes are what counts)."""
    model = problem.model
    clusters = cluster_groups(model, problem.groups, ks, "even")
    with torch.no_grad():
        return merge(model, problem.groups, clusters).eval()


def width_key(problem: Problem, ks: Widths) -> str:
    """What names the network at ``ks`` in the timing cache: the widths before and after."""
    now = [g.width for g in problem.groups]
    return f"{now}->{[ks.get(g.name, g.width) for g in problem.groups]}"


def measured_ratio(
    problem: Problem, ks: Widths, again: bool = False, rounds: int | None = None
) -> float:
    """The network at ``ks`` timed beside the current one: its time's share of it."""
    assert problem.timings is not None
    build = lambda: thin_at(problem, ks)  # noqa: E731
    k = width_key(problem, ks)
    return problem.timings.ratio(problem.model, build, k, problem.shape, again, rounds)


def unreachable(target: Target, floor: float, problem: Problem) -> CsgdError:
    return CsgdError(
        f"target={target.spec} cannot be met with the groups allowed: the smallest "
        f"reachable is {target.kind}:{floor:.4g} (every allowed group at its narrowest, "
        f"min_width={problem.min_width}, round_to={problem.round_to})",
        f"pass target={target.kind}:{floor:.4g} or more, a smaller min_width, "
        "or include more groups",
    )


def name_of(problem: Problem) -> str:
    arch = getattr(problem.model, "arch", None) or {}
    return arch.get("name") or type(problem.model).__name__


def setup(problem: Problem, target: Target) -> tuple[TermCost, dict[str, list[int]]]:
    """The target's cost over the allowed groups' widths, and their candidate widths."""
    kind = TARGETS[target.kind]
    if kind.measured and problem.timings is None:
        backend = problem.runtime.backend
        if backend not in BACKENDS:
            raise CsgdError(f"backend={backend} is unknown", f"pass backend=<{'|'.join(BACKENDS)}>")
        require_runtime(backend)
        if not isinstance(problem.x, torch.Tensor):
            raise CsgdError("a latency target times one tensor input", "pass a count target")
        problem.timings = Timings(name_of(problem), problem.runtime, problem.cache_dir)
    step = kind.step(problem.round_to)
    by_name = {g.name: g for g in problem.groups}
    cands = {n: candidate_widths(by_name[n].width, step, problem.min_width) for n in problem.names}
    shapes = Shapes(problem.model, problem.groups, set(problem.names))
    return kind.cost(problem, shapes, cands), cands


def reach(
    problem: Problem,
    target: Target,
    cost: TermCost,
    cands: dict[str, list[int]],
    base_cost: float | None,
) -> tuple[float, float]:
    """(the current network's cost, the smallest fraction of ``base_cost`` (default:
    that cost) the allowed groups reach); a latency is timed (ms), the floor against it."""
    lowest = {g: c[0] for g, c in cands.items()}
    if not TARGETS[target.kind].measured:
        now = cost.cost({})
        return now, cost.cost(lowest) / (base_cost or now)
    timings = problem.timings
    assert timings is not None
    r = measured_ratio(problem, lowest, rounds=3 * latency.ROUNDS)  # the anchor: 3x the rounds
    timings.save()
    now = timings.data["base_ms"][width_key(problem, lowest)]
    return now, r * now / (base_cost or now)
