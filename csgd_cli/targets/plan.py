"""Choosing widths, a step of its own: ``plan_widths`` returns a plain ``WidthPlan`` (each
pruned group's width after the merge) from a model, an example input and a ratio or a
target. ``CSGD(model, x, widths=plan)`` then clusters at those widths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..common.config import RATIO, default_min_width
from ..common.errors import CsgdError
from ..common.target import Target
from ..core.clustering import target_widths
from ..deploy.latency import Runtime
from ..rules.groups import ChannelGroup, select_groups
from ..tracing.trace import channel_groups
from .problem import Problem, width_share
from .resolution import at_resolution
from .widths import choose


@dataclass(frozen=True)
class WidthPlan:
    """Each pruned group's width after the merge (``widths``), every group's original
    width (``original``: iterative rounds keep the first round's), how the plan was
    chosen (``settings``) and, for a target, what it reached (``report``)."""

    widths: dict[str, int]
    original: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @property
    def share(self) -> float:
        """The pruned groups' widths as a share of their original widths."""
        return width_share(self.original, self.widths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": dict(self.widths),
            "original": dict(self.original),
            "settings": dict(self.settings),
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WidthPlan:
        return cls(
            dict(d["widths"]), dict(d["original"]), dict(d.get("settings") or {}), d.get("report")
        )


def check_ratio(ratio: float | None, target: str | Target | None) -> float | None:
    """The one rule for ``ratio`` and ``target``: at most one of them (neither: the
    default ratio), a ratio in (0, 1]."""
    if target is not None and ratio is not None:
        raise CsgdError(f"ratio={ratio} and target={target!s} both given", "pass one of them")
    if target is None and ratio is None:
        return RATIO
    if ratio is not None and not 0 < ratio <= 1:
        raise CsgdError(f"ratio={ratio} is out of range", "pass 0 < ratio <= 1")
    return ratio


def plan_widths(
    model: nn.Module,
    example_input: Any = None,
    *,
    ratio: float | None = None,
    target: str | Target | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    round_to: int = 1,
    min_width: int | None = None,
    rule: str = "distortion",
    seed: int = 0,
    runtime: Runtime | None = None,
    cache_dir: str | Path | None = None,
    original: dict[str, int] | None = None,
    original_cost: float | None = None,
    groups: list[ChannelGroup] | None = None,
    resolution: int | tuple[int, int] | None = None,
) -> WidthPlan:
    """Widths for the groups ``include``/``exclude`` select: ``ratio`` of each original
    width (rounded to a multiple of ``round_to``; default the paper's 5/8), or per-group
    widths by ``rule`` that keep ``target`` (``"flops:0.45"``, ``"params:0.5"``,
    ``"latency:0.5"``) of the model's cost, none narrower than ``min_width`` (default
    max(round_to, 4)). A latency target is timed in ``runtime`` (backend, batch,
    threads), the timings kept under ``cache_dir``. FLOPs are counted at the example
    input's resolution, or at ``resolution`` (pixels, or (height, width)): the example input
    resized to the deployment's images; the report says which (``resolution``).
    Iterative rounds pass the first round's ``original`` widths and
    ``original_cost`` (the base's cost) so that every round aims at the base."""
    ratio = check_ratio(ratio, target)
    if round_to < 1:
        raise CsgdError(f"round_to={round_to} is out of range", "pass round_to >= 1")
    groups = channel_groups(model, example_input) if groups is None else groups
    original = dict(original or {g.name: g.width for g in groups})
    chosen = select_groups(groups, include, exclude)
    settings: dict[str, Any] = {
        "ratio": ratio,
        "target": None if target is None else Target.parse(target).spec,
        "include": list(include),
        "exclude": list(exclude),
        "round_to": round_to,
        "min_width": min_width,
        "rule": rule,
        "seed": seed,
    }
    if ratio is not None:
        return WidthPlan(target_widths(chosen, ratio, original, round_to), original, settings)
    if example_input is None:
        from ..tracing.trace import example_input as guess

        example_input = guess(model)
    example_input = at_resolution(example_input, resolution)  # the deployment's images
    problem = Problem(
        model,
        groups,
        [g.name for g in chosen],
        example_input,
        round_to,
        min_width or default_min_width(round_to),
        runtime or Runtime(),
        Path(cache_dir) if cache_dir is not None else None,
    )
    choice = choose(problem, Target.parse(target), rule, seed, original, original_cost)  # type: ignore[arg-type]
    return WidthPlan(dict(choice.widths), original, settings, choice.report)
