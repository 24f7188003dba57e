"""A latency target's choice, confirmed by timing in a way noise cannot push the harmful
way (``widths.choose`` calls ``choose_timed``).

Timings on a shared machine are only ever too slow, and a network that is timed too slow
must not send the choice to the thinnest network (the worst answer for accuracy). So:

- in a runtime whose layers do not add up to the network (``latency.WHOLE_NETWORK``:
  INT8, whose quantize/dequantize pairs fuse across layers and whose kernels take
  channels in blocks; OpenVINO, which fuses), the per-layer model is first *calibrated*
  on whole networks: the rule's widths at ``CALIBRATE`` modelled times evenly between the
  floor and the current network are built, exported (and quantised) and timed in the
  runtime; the measured ratios, piecewise-linear over the modelled time, are the model
  from then on (elsewhere the current network and the floor are its only points);
- the *modelled* choice comes first: the rule run at the modelled time whose measured
  ratio interpolates (over those points) to the target; it is the fallback whatever the
  timings say;
- up to ``CONFIRMS`` candidates are timed beside the current network (``deploy.timer``:
  interleaved rounds, the median of per-round ratios), each refining the interpolation;
- the widest candidate timed within the target is *re-checked* (timed again beside the
  base, the slower of the two ratios kept); the first that holds wins;
- when none holds, the modelled choice is kept and the target is reported as not met,
  with the modelled and the timed ratio. The floor is chosen only when the model itself
  lands there.

Before the search, a target near the floor is described: the multiply-adds it takes and
the batch at which the same target would be cheaper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("csgd")
CONFIRMS = 4  # timed candidates per latency choice (the floor and base not counted)
CALIBRATE = 3  # whole networks timed first in a WHOLE_NETWORK runtime (evenly spaced)
NEAR = 0.25  # a target within this share of the reachable range above the floor is "near"
Widths = dict[str, int]


@dataclass
class TimedChoice:
    widths: Widths
    ratio: float  # as timed (the re-check's ratio when confirmed)
    confirmed: bool
    modelled: float  # the ratio the interpolation promised for ``widths``
    timed: list[tuple[float, float]] = field(default_factory=list)  # (modelled ms, ratio)
    calibrated: int = 0  # whole networks timed to calibrate the model before the search


def near_floor(want: float, floor: float) -> bool:
    """``want`` sits in the lowest ``NEAR`` of the range the groups can reach."""
    return want - floor < NEAR * (1 - floor)


def _interp(points: list[tuple[float, float]], want: float) -> float:
    """The modelled time whose ratio interpolates to ``want`` over ``points``."""
    pts = sorted(points)
    i = max((j for j, (_, r) in enumerate(pts) if r <= want), default=0)
    (x1, y1), (x2, y2) = pts[i], pts[min(i + 1, len(pts) - 1)]
    return x1 if y2 <= y1 else x1 + (want - y1) * (x2 - x1) / (y2 - y1)


def _promised(model: list[tuple[float, float]], x: float) -> float:
    """The ratio the model's points (modelled time, measured ratio: the current network,
    the floor and any calibration) interpolate to at time ``x``, piecewise-linearly."""
    pts = sorted(model)
    j = next((i for i in range(1, len(pts)) if x <= pts[i][0]), len(pts) - 1)
    (x1, y1), (x2, y2) = pts[max(j - 1, 0)], pts[j]
    return y1 if x2 == x1 else y1 + (x - x1) * (y2 - y1) / (x2 - x1)


@dataclass
class _Search:
    """What one latency search has timed so far (``seen``: key -> (ratio, widths)) and the
    points the interpolation reads (modelled time, ratio)."""

    cost: Any
    pick: Callable[[float], Widths]
    measure: Callable[[Widths, bool], float]
    key: Callable[[Widths], str]
    points: list[tuple[float, float]]
    seen: dict[str, tuple[float, Widths]]

    def time(self, ks: Widths, what: str) -> float:
        r = self.measure(ks, False)
        self.seen[self.key(ks)] = (r, ks)
        self.points.append((self.cost.cost(ks), r))
        log.info("latency: %s, modelled %.3g ms: timed %.3f", what, self.cost.cost(ks), r)
        return r

    def calibrate(self, n: int, floor_ms: float, base_ms: float) -> None:
        """Times the rule's widths at ``n`` modelled times evenly between floor and now."""
        for i in range(1, n + 1):
            ks = self.pick(floor_ms + (base_ms - floor_ms) * i / (n + 1))
            if self.key(ks) not in self.seen and self.key(ks) != self.key({}):
                self.time(ks, "calibration")  # (not the current network again)

    def candidate(self, want: float, floor_ms: float, hit: Callable[[float], bool]) -> Widths:
        """The rule's widths at the time the points interpolate to ``want``; a step narrower
        while that was timed already and not within the target's last 5%."""
        budget = _interp(self.points, want)
        ks = self.pick(budget)
        while self.key(ks) in self.seen and not hit(self.seen[self.key(ks)][0]):
            if budget <= floor_ms:
                break
            budget = self.cost.cost(ks) * (1 - 1e-9)
            narrower = self.pick(budget)
            if self.key(narrower) == self.key(ks):  # noisy timings: no step lowers the
                break  # modelled time, and asking again would loop forever
            ks = narrower
        return ks


def choose_timed(
    cost: Any,
    cands: dict[str, list[int]],
    want: float,
    floor: float,
    pick: Callable[[float], Widths],
    measure: Callable[[Widths, bool], float],
    key: Callable[[Widths], str],
    confirms: int = CONFIRMS,
    calibrate: int = 0,
) -> TimedChoice:
    """See the module. ``pick(budget)``: the rule's widths at a modelled time;
    ``measure(ks, again)``: their ratio to the current network (``again``: timed once
    more, the slower kept); ``key(ks)``: what identifies a candidate; ``calibrate``:
    whole networks timed first (``CALIBRATE`` in a ``WHOLE_NETWORK`` runtime)."""
    lowest = {g: c[0] for g, c in cands.items()}
    base_ms, floor_ms = cost.cost({}), cost.cost(lowest)
    search = _Search(
        cost,
        pick,
        measure,
        key,
        [(base_ms, 1.0), (floor_ms, floor)],
        {key(lowest): (floor, lowest)},
    )
    search.calibrate(calibrate, floor_ms, base_ms)
    model = list(search.points)  # what the modelled ratio of a choice is read from
    n_cal = len(model) - 2
    hit = lambda r: 0.95 * want <= r <= want  # noqa: E731 - close enough: stop searching
    modelled: tuple[Widths, float] | None = None
    for _ in range(confirms):
        ks = search.candidate(want, floor_ms, hit)
        if modelled is None:
            modelled = (ks, _promised(model, cost.cost(ks)))
        if key(ks) in search.seen or hit(search.time(ks, f"want <= {want:.3f}")):
            break
    assert modelled is not None
    return _confirm(search, modelled, want, key(lowest), model, n_cal)


def _confirm(
    search: _Search,
    modelled: tuple[Widths, float],
    want: float,
    floor_key: str,
    model: list[tuple[float, float]],
    n_cal: int,
) -> TimedChoice:
    """Re-checks the candidates timed within the target, widest first; the first that
    holds wins, else the modelled choice is kept and reported as not met."""
    cost, model_key = search.cost, search.key(modelled[0])
    passed = [  # the floor only when the model lands there
        (r, ks)
        for k, (r, ks) in search.seen.items()
        if r <= want and (k != floor_key or model_key == k)
    ]
    for r, ks in sorted(passed, key=lambda p: -cost.cost(p[1])):  # widest first
        again = search.measure(ks, True)
        if again <= want:
            promised = _promised(model, cost.cost(ks))
            return TimedChoice(ks, again, True, promised, search.points, n_cal)
        log.info(
            "latency: re-check of a candidate timed %.3f, then %.3f (want <= %.3f)", r, again, want
        )
    ks, promised = modelled
    seen = search.seen
    timed = seen[model_key][0] if model_key in seen else search.measure(ks, False)
    log.warning(
        "latency target %.3g not confirmed: the modelled choice (%.3f of the base as "
        "modelled) timed %.3f; kept it, reported as not met",
        want,
        promised,
        timed,
    )
    return TimedChoice(ks, timed, False, promised, search.points, n_cal)


def floor_note(
    want: float, floor: float, batch: int, macs_share: float, floors_at: dict[int, float]
) -> str:
    """What a target near the floor costs, in one line: the multiply-adds its modelled
    choice keeps, and the batches at which the floor sits lower (``floors_at``: batch ->
    floor's ratio there)."""
    note = (
        f"latency:{want:.3g} at batch {batch} is near the floor (the narrowest network "
        f"times {floor:.3f} of the base): it takes multiply-adds down to {macs_share:.3f} "
        f"of the base ({1 / max(macs_share, 1e-9):.1f}x fewer)"
    )
    cheaper = [b for b, f in sorted(floors_at.items()) if not near_floor(want, f)]
    if cheaper:
        b = cheaper[0]
        note += (
            f"; at batch {b} the floor times {floors_at[b]:.3f}, so the same target "
            "would keep more width there"
        )
    elif floors_at:
        tried = ", ".join(f"batch {b}: {f:.3f}" for b, f in sorted(floors_at.items()))
        note += f"; no batch tried makes it cheaper (floor {tried})"
    return note
