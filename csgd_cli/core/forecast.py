"""How far C-SGD pulls each cluster together over a schedule, known before training.

Inside a cluster every member gets the same averaged task gradient, so the difference
``d`` of two members' rows sees only the decay ``c = weight_decay + epsilon`` (kernels)
or ``c = norm_weight_decay + norm_epsilon`` (norm gamma/beta, biases). With momentum
``mu`` the optimizer (``optim.CentripetalSGD``) makes ``d`` follow, per step ``t``,

    v_{t+1} = mu v_t + c d_t
    d_{t+1} = d_t - lr_t (c d_t + mu v_{t+1})   (Nesterov)
    d_{t+1} = d_t - lr_t v_{t+1}                (heavy ball)

from ``d_0 = 1, v_0 = 0``: the same scalar for every row of every cluster, whatever the
data. So ``chi_t = d_t^2 chi_0`` exactly, and ``decay`` simulates it step by step.

The merge needs the differences to fall by about its tolerance: ``reach`` uses the
envelope of ``d`` (a damped oscillation's peaks, not a zero crossing) and the worse of
kernels and norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def round_up(x: float) -> str:
    """``x`` to 3 significant digits, rounded up: advice passed as printed must itself
    reach the tolerance (rounded down it may fall just short)."""
    s = f"{x:.3g}"
    if float(s) < x:
        s = f"{float(s) + 10 ** (math.floor(math.log10(x)) - 2):.3g}"
    return s


def _matrix(lr: float, mu: float, nesterov: bool, c: float) -> np.ndarray:
    """One step on the state (d, v) (v: the momentum buffer's difference)."""
    if nesterov:
        return np.array([[1 - lr * c * (1 + mu), -lr * mu * mu], [c, mu]])
    return np.array([[1 - lr * c, -lr * mu], [c, mu]])


def envelope(d: float, v: float, lr: float, mu: float, nesterov: bool, c: float) -> float:
    """The largest |d| the state (d, v) can show from here on at the rate ``lr``: the
    sum of its modes' amplitudes (a damped oscillation's envelope, not its value)."""
    _vals, vecs = np.linalg.eig(_matrix(lr, mu, nesterov, c))
    if np.linalg.cond(vecs) > 1e8:  # a double root: no eigenbasis, the value will do
        return abs(d) + abs(lr * v)
    coef = np.linalg.solve(vecs, np.array([d, v], dtype=complex))
    return float(np.abs(coef * vecs[0]).sum())


def _final_state(lrs: np.ndarray, mu: float, nesterov: bool, c: float) -> tuple[float, float]:
    """(d, v) after every step from (1, 0): the product of the per-step 2x2 matrices,
    multiplied pairwise (exact, vectorised: O(steps) work in log2(steps) numpy calls)."""
    x = lrs * c
    m = np.empty((len(lrs), 2, 2))
    if nesterov:
        m[:, 0, 0], m[:, 0, 1] = 1 - x * (1 + mu), -lrs * mu * mu
    else:
        m[:, 0, 0], m[:, 0, 1] = 1 - x, -lrs * mu
    m[:, 1, 0], m[:, 1, 1] = c, mu
    with np.errstate(all="ignore"):
        while len(m) > 1:
            if len(m) % 2:
                m = np.concatenate([m, np.eye(2)[None]])
            m = m[1::2] @ m[0::2]  # the later step on the left
    if not len(m):
        return 1.0, 0.0
    return float(m[0, 0, 0]), float(m[0, 1, 0])


@dataclass(frozen=True)
class Decay:
    """``d`` (signed, exact) at each requested step, and its envelope at the last one."""

    steps: list[int]
    values: list[float]
    final: float  # envelope after the last step (what the merge will see, at worst)


def decay(
    lrs: Sequence[float], momentum: float, nesterov: bool, coef: float, at: Sequence[int] = ()
) -> Decay:
    """Simulate the within-cluster difference over the per-step learning rates ``lrs``;
    ``values[i]`` is d after ``at[i]`` steps (stepped one by one), ``final`` the envelope
    after the last step."""
    lrs_ = np.asarray(lrs, dtype=np.float64)
    mu, c = float(momentum), float(coef)
    want = sorted(set(int(s) for s in at))
    out, k, d, v = [], 0, 1.0, 0.0
    while k < len(want) and want[k] <= 0:
        out.append(1.0)
        k += 1
    if want:
        for t, lr in enumerate(lrs_[: want[-1]].tolist(), start=1):
            v = mu * v + c * d
            d = d - lr * (c * d + mu * v) if nesterov else d - lr * v
            while k < len(want) and want[k] == t:
                out.append(d)
                k += 1
            if not math.isfinite(d):
                break
    d, v = _final_state(lrs_, mu, nesterov, c)
    last = float(lrs_[-1]) if len(lrs_) else 0.0
    ok = math.isfinite(d) and math.isfinite(v)
    final = envelope(d, v, last, mu, nesterov, c) if ok else math.inf
    return Decay(want[: len(out)], out, final)


@dataclass(frozen=True)
class Forecast:
    """How far within-cluster differences fall over ``steps`` steps: ``kernel`` and
    ``affine`` (norm gamma/beta, biases) envelopes, as fractions of their start."""

    steps: int
    kernel: float
    affine: float

    @property
    def worst(self) -> float:
        return max(self.kernel, self.affine)

    def chi(self, chi0: float) -> float:
        """The kernel chi the schedule leaves from ``chi0`` at its start (at most)."""
        return chi0 * self.kernel**2


def forecast(
    lr_schedule: Sequence[float] | Callable[[int], float],
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    epsilon: float,
    steps: int | None = None,
    norm_epsilon: float | None = None,
    norm_weight_decay: float = 0.0,
) -> Forecast:
    """The forecast of a schedule: ``lr_schedule`` a learning rate per step (or a
    function of the step, with ``steps``); ``norm_epsilon`` None means 0.1 x epsilon,
    as the optimizer takes it."""
    if callable(lr_schedule):
        if steps is None:
            raise ValueError("a learning-rate function needs steps=")
        lrs = np.array([float(lr_schedule(t)) for t in range(steps)])
    else:
        lrs = np.asarray(lr_schedule, dtype=np.float64)[:steps]
    neps = 0.1 * epsilon if norm_epsilon is None else norm_epsilon
    nest = nesterov and momentum > 0
    kern = decay(lrs, momentum, nest, weight_decay + epsilon).final
    aff = decay(lrs, momentum, nest, norm_weight_decay + neps).final
    return Forecast(len(lrs), kern, aff)


# -- a csgd ``schedule`` config --------------------------------------------------------
def schedule_lrs(sched: Any, steps_per_epoch: int, epochs: int | None = None) -> np.ndarray:
    """Per-step learning rates of a ``schedule`` config, as ``optim.lr_lambda`` gives
    them to the trainer (vectorised), for ``epochs`` (default: its own; a multistep
    schedule's milestones then scale with it, so its shape is kept)."""
    s = _plain(sched)
    if epochs is not None and epochs != s.epochs:
        s.milestones, s.epochs = scaled_milestones(sched, epochs), epochs
    total, warm = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch
    t = np.arange(total, dtype=np.float64)
    if s.kind == "cosine":
        f = 0.5 * (1 + np.cos(np.pi * (t - warm) / max(1, total - warm)))
    else:
        ms = np.array([m * steps_per_epoch for m in s.milestones], dtype=np.float64)
        f = float(s.gamma) ** (t[:, None] >= ms[None]).sum(1) if len(ms) else np.ones(total)
    f = np.where(t < warm, (t + 1) / max(warm, 1), f)
    return s.lr * f


def scaled_milestones(sched: Any, epochs: int) -> list[int]:
    """The milestones of ``sched`` stretched to ``epochs`` (its shape kept), as the
    forecast of that many epochs (``schedule_lrs``) takes them."""
    scale = epochs / max(int(sched.epochs), 1)
    return [max(1, round(int(m) * scale)) for m in sched.milestones]


def _plain(sched: Any) -> Any:
    from types import SimpleNamespace

    keys = "epochs lr momentum nesterov weight_decay kind gamma warmup_epochs".split()
    out = SimpleNamespace(**{k: getattr(sched, k) for k in keys})
    out.milestones = [int(m) for m in sched.milestones]
    return out


def schedule_forecast(
    sched: Any,
    steps_per_epoch: int,
    epsilon: float,
    norm_epsilon: float | None,
    epochs: int | None = None,
) -> Forecast:
    """``forecast`` of a ``schedule`` config (norm gamma/beta decay only by norm_epsilon,
    as ``CentripetalSGD`` treats a pruned group's norms)."""
    lrs = schedule_lrs(sched, steps_per_epoch, epochs)
    return forecast(
        lrs, sched.momentum, sched.nesterov, sched.weight_decay, epsilon, norm_epsilon=norm_epsilon
    )


def epoch_curve(sched: Any, steps_per_epoch: int, coef: float) -> list[float]:
    """d^2 (the factor on chi) at the end of every epoch: chi_forecast = chi_0 x this."""
    lrs = schedule_lrs(sched, steps_per_epoch)
    at = [steps_per_epoch * (e + 1) for e in range(sched.epochs)]
    res = decay(lrs, sched.momentum, sched.nesterov and sched.momentum > 0, coef, at)
    return [x * x for x in res.values] + [math.inf] * (len(at) - len(res.values))


def sufficient(
    sched: Any,
    steps_per_epoch: int,
    epsilon: float,
    norm_epsilon: float | None,
    tolerance: float,
    max_epochs: int = 1_000_000,
) -> dict[str, float | int | None]:
    """What would reach ``tolerance``: the smallest ``epsilon`` (``norm_epsilon`` in
    the same proportion to it; where none does, ``norm_epsilon`` equal to it) and the
    fewest ``epochs`` (milestones scaled along); None where none up to a bound does."""
    ratio = 0.1 if norm_epsilon is None else norm_epsilon / max(epsilon, 1e-30)

    def ok(eps: float, r: float, epochs: int) -> bool:
        f = schedule_forecast(sched, steps_per_epoch, eps, r * eps, epochs)
        return f.worst <= tolerance

    out: dict[str, float | int | None] = {"epsilon": None, "norm_epsilon": None, "epochs": None}
    for r in dict.fromkeys((ratio, 1.0)):  # the user's proportion first
        prev = max(epsilon, 1e-6)
        for _ in range(1, 40):  # the first doubling that works, then bisection
            e = prev * 2
            if e > 1e3:
                break
            if ok(e, r, sched.epochs):
                lo, hi = prev, e
                for _ in range(30):
                    mid = math.sqrt(lo * hi)
                    lo, hi = (lo, mid) if ok(mid, r, sched.epochs) else (mid, hi)
                out["epsilon"], out["norm_epsilon"] = hi, None if r == ratio else hi
                break
            prev = e
        if out["epsilon"] is not None:
            break
    lo, n = sched.epochs, max(1, sched.epochs) * 2
    while n <= max_epochs and not ok(epsilon, ratio, n):
        lo, n = n, n * 2
    if n <= max_epochs:
        hi = n
        while hi - lo > max(1, hi // 100):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(epsilon, ratio, mid) else (mid, hi)
        out["epochs"] = hi
    return out
