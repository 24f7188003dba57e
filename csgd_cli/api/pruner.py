"""C-SGD in any training loop: the public API (the CLI's stages use it too).

    import csgd_cli as csgd
    pruner = csgd.CSGD(model, example_input, ratio=0.625)   # or widths=csgd.plan_widths(...)
    opt = pruner.optimizer(lr=0.01, epsilon=3e-3, momentum=0.9, weight_decay=1e-4)
    ...  # the user's own loop: opt.zero_grad(); loss.backward(); opt.step()
    thin = pruner.merge()                 # physically thinner, same function
    csgd.save(thin, "pruned.pt")
    thin2 = csgd.load_model("pruned.pt", model=MyNet())

The model may be wrapped in ``DistributedDataParallel`` or compiled by ``torch.compile``
(the module underneath is pruned). Build the pruner on every rank from the same weights
and seed (k-means is seeded, so every rank gets the same clusters), or pass rank 0's
``pruner.clusters`` to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.config import EPSILON
from ..common.errors import CsgdError
from ..common.nets import run_model
from ..core.chi import chi_report
from ..core.clustering import check_method, cluster_groups
from ..core.forecast import Forecast, forecast
from ..core.optim import CentripetalSGD
from ..core.stats import average_statistics
from ..core.surgery import merge_checked
from ..core.trial import check_thin_forward
from ..rules.groups import ChannelGroup, Clusters, check_clusters, describe
from ..targets.plan import WidthPlan, plan_widths
from ..tracing.trace import channel_groups, example_input
from .checkpoint import (
    check_shapes,
    load_checkpoint,
    load_into,
    model_from_checkpoint,
    save_checkpoint,
)
from .record import PruneRecord, user_arch

STATE_FORMAT = 2  # CSGD.state_dict() layout (2: the width plan; epsilon is the optimizer's)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper or ``torch.compile`` holds (the one whose layers change)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class CSGD:
    """Channel groups, clusters and the centripetal optimizer of one network.

    Widths: ``ratio`` (clusters per group = round(ratio x original width), default the
    paper's 5/8), ``target`` (``"flops:0.45"``, ``"params:0.5"``, ``"latency:0.5"``,
    chosen with ``plan_widths``' defaults), or ``widths``: a ``WidthPlan`` from
    ``csgd.plan_widths(...)`` (every width setting: rule, round_to, min_width, runtime)
    or a plain ``{group: width}`` dict. ``include``/``exclude``: globs over group names
    (``describe()`` lists them) for a ratio or target. ``clusters``: reuse saved ones
    (``pruner.clusters`` of an earlier run). Epsilon goes with the optimizer:
    ``pruner.optimizer(lr, epsilon=...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        ratio: float | None = None,
        target: str | None = None,
        widths: WidthPlan | dict[str, int] | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        clustering: str = "kmeans",
        seed: int = 0,
        clusters: Clusters | None = None,
    ) -> None:
        check_method(clustering)
        self.model = unwrap(model)
        self.example_input = example_input
        self.clustering, self.seed = clustering, seed
        self.groups: list[ChannelGroup] = channel_groups(self.model, example_input)
        self._optimizers: list[Any] = []
        self.merge_report: dict[str, Any] | None = None
        if widths is not None and (ratio is not None or target is not None):
            raise CsgdError("widths= and ratio=/target= both given", "pass one of them")
        original = {g.name: g.width for g in self.groups}
        if clusters is not None:
            clusters = {k: [list(map(int, c)) for c in v] for k, v in dict(clusters).items()}
            check_clusters(self.groups, clusters, "clusters=")
            self.clusters: Clusters = clusters
            if not isinstance(widths, WidthPlan):
                widths = WidthPlan({k: len(v) for k, v in clusters.items()}, original)
            self.plan = widths
            return
        if widths is None:
            self.plan = plan_widths(
                self.model,
                example_input,
                ratio=ratio,
                target=target,
                include=include,
                exclude=exclude,
                seed=seed,
                groups=self.groups,
            )
        elif isinstance(widths, WidthPlan):
            self.plan = widths
        else:
            self.plan = WidthPlan({k: int(v) for k, v in dict(widths).items()}, original)
        self.clusters = cluster_groups(
            self.model, self._planned(), self.plan.widths, clustering, seed
        )
        check_thin_forward(self.model, self.groups, self.clusters, example_input)  # runs?

    def _planned(self) -> list[ChannelGroup]:
        by_name = {g.name: g for g in self.groups}
        unknown = sorted(set(self.plan.widths) - set(by_name))
        if unknown:
            raise CsgdError(
                f"widths= names {unknown[0]!r}, not a channel group of this model",
                "pass a plan made for this model (pruner.describe() lists its groups)",
            )
        return [by_name[n] for n in self.plan.widths]

    def _input(self) -> Any:
        if self.example_input is None:
            self.example_input = example_input_for(self.model)
        return self.example_input

    # -- what the pruner knows --------------------------------------------------------
    @property
    def widths(self) -> dict[str, int]:
        """Width of every pruned group after the merge (its number of clusters)."""
        return {name: len(cl) for name, cl in self.clusters.items()}

    @property
    def target_report(self) -> dict[str, Any] | None:
        """A target's: what it asked, what the chosen widths reach (``plan.report``)."""
        return self.plan.report

    def describe(self) -> str:
        """Every group: name, width, members by kind, excluded or not and why."""
        return describe(self.groups)

    def excluded(self) -> dict[str, str]:
        """Groups that cannot be merged exactly, with the reason."""
        return {g.name: g.excluded for g in self.groups if g.excluded is not None}

    # -- training -----------------------------------------------------------------------
    def optimizer(
        self,
        lr: float,
        *,
        epsilon: float = EPSILON,
        norm_epsilon: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        plain_norm_weight_decay: float | None = None,
    ) -> CentripetalSGD:
        """The C-SGD optimizer over every parameter of the model (a torch Optimizer:
        learning-rate schedulers, GradScaler and DDP work with it). ``epsilon``: the
        centripetal strength; ``norm_epsilon`` the pull on norm gamma/beta and biases
        (default 0.1 x epsilon). For speed it makes every parameter a view into one
        flat buffer; ``merge()`` (or ``opt.release()``) gives each its own storage back."""
        if epsilon < 0 or (norm_epsilon is not None and norm_epsilon < 0):
            raise CsgdError("epsilon and norm_epsilon must be >= 0", "pass a value >= 0")
        opt = CentripetalSGD(
            self.model,
            self.groups,
            self.clusters,
            lr=lr,
            epsilon=float(epsilon),
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
            norm_epsilon=norm_epsilon,
            plain_norm_weight_decay=plain_norm_weight_decay,
        )
        self._optimizers.append(opt)
        return opt

    def wrap(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        epsilon: float = EPSILON,
        norm_epsilon: float | None = None,
    ) -> torch.optim.Optimizer:
        """Turn any torch optimizer over the model (AdamW, SGD, ...) into C-SGD, in place:
        cluster-mean gradients before its step, the centripetal pull (``epsilon``;
        ``norm_epsilon`` on norm gamma/beta and biases, default 0.1 x epsilon) after it
        (``csgd_cli.core.wrap``). Returns ``optimizer``."""
        from ..core.wrap import CentripetalWrap

        if epsilon < 0 or (norm_epsilon is not None and norm_epsilon < 0):
            raise CsgdError("epsilon and norm_epsilon must be >= 0", "pass a value >= 0")
        CentripetalWrap(optimizer, self.model, self.groups, self.clusters, epsilon, norm_epsilon)
        return optimizer  # itself: its class, state, schedulers and checkpoints unchanged

    def chi_report(self, affine: bool = False) -> dict[str, Any]:
        """Chi in total, relative to the kernels' squared norm, the largest deviation,
        and per group (``affine``: norm gamma/beta and biases included)."""
        return chi_report(self.model, self.groups, self.clusters, affine)

    def chi(self) -> float:
        """The kernel deviation: sum over clusters of ||K_i - mean K||^2 (falls to 0)."""
        return float(self.chi_report()["chi"])

    def ready(self, tolerance: float = 1e-4, example_input: Any = None) -> bool:
        """True exactly when ``merge(example_input, tolerance=tolerance)`` will pass: it
        runs the merge's own check (the thin network's outputs against the model's on
        ``example_input``, default the pruner's), without keeping the thin network.
        Kernels, norm gamma/beta and running statistics all count (``core.stats``)."""
        x = example_input if example_input is not None else self._input()
        _, rep = merge_checked(
            self.model, self.groups, self.clusters, x, tolerance=tolerance, force=True
        )
        return rep["passed"]

    def sync_statistics(self) -> None:
        """Set every cluster's BatchNorm running statistics to their mean, in the model
        (csgd's optimizer does this after every step; a model trained otherwise may
        need it once before ``merge``)."""
        average_statistics(self.model, self.groups, self.clusters)

    def forecast(
        self,
        lrs: Sequence[float],
        *,
        epsilon: float = EPSILON,
        norm_epsilon: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
    ) -> Forecast:
        """How far the within-cluster differences fall over a schedule (``lrs``: the
        learning rate of every step), before training (``core.forecast``): kernels and
        norm gamma/beta as fractions of their start; about ``tolerance`` is needed."""
        return forecast(lrs, momentum, nesterov, weight_decay, epsilon, norm_epsilon=norm_epsilon)

    # -- the merge ----------------------------------------------------------------------
    def merge(
        self, example_input: Any = None, *, tolerance: float = 1e-4, force: bool = False
    ) -> nn.Module:
        """The physically thinner network (the same class, its layers resized), checked
        against the trained one on ``example_input`` (default: the pruner's): every
        output within ``tolerance`` (relative) or refused unless ``force``. The report
        is kept in ``merge_report``."""
        x = example_input if example_input is not None else self._input()
        for opt in self._optimizers:  # the merge resizes parameters: untie them first
            opt.release()
        self._optimizers.clear()
        thin, rep = merge_checked(
            self.model, self.groups, self.clusters, x, tolerance=tolerance, force=force
        )
        self.merge_report = rep
        if getattr(thin, "arch", None) is None:  # the user's own class: the widths cut to
            thin.arch = user_arch(thin, rep["group_widths"])
        return thin

    # -- the user's own checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (clusters, the width plan, clustering settings) to resume with
        ``from_state_dict``."""
        return {
            "format": STATE_FORMAT,
            "clusters": self.clusters,
            "plan": self.plan.to_dict(),
            "clustering": self.clustering,
            "seed": self.seed,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, state: dict[str, Any], example_input: Any = None
    ) -> CSGD:
        """The pruner ``state_dict()`` saved, over ``model`` (its weights as trained)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CsgdError(
                "not a CSGD.state_dict() of this csgd version",
                "pass the dict pruner.state_dict() returned",
            )
        return cls(
            model,
            example_input,
            widths=WidthPlan.from_dict(state["plan"]),
            clusters=state["clusters"],
            clustering=state["clustering"],
            seed=state["seed"],
        )


def example_input_for(model: nn.Module) -> torch.Tensor:
    """An input of the model's shape, for a merge check when the user gave none."""
    x = example_input(model)
    was_training = model.training
    try:
        with torch.no_grad():
            run_model(model.eval(), x)
    except Exception as e:  # the guessed shape does not fit this network
        raise CsgdError(
            f"cannot guess an input for {type(model).__name__} ({type(e).__name__})",
            "pass example_input to CSGD(...) or to merge(...)",
        ) from None
    finally:
        model.train(was_training)
    return x


def save(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` (base, trained or merged) atomically; it loads with
    ``load_model`` and ``torch.load(..., weights_only=True)``, running no code."""
    net = unwrap(model)
    arch = getattr(net, "arch", None) or user_arch(net)  # a merged one's: with its widths
    info = PruneRecord().into({"arch": arch, **extra})
    return save_checkpoint(path, {**info, "state_dict": net.state_dict()})


def load_model(
    path: str | Path, model: nn.Module | None = None, trust: tuple[str, ...] = ()
) -> nn.Module:
    """A network from any file csgd writes, in eval mode. ``model``: a fresh instance of
    your own class, resized to the file's widths and loaded (nothing named in the file is
    imported or run). Without it, csgd rebuilds its own networks; a ``model=custom``
    file names the callable that builds it: pass that dotted path in ``trust``."""
    ck = load_checkpoint(path, None)
    if model is not None:
        check_shapes(unwrap(model), ck, str(path))  # another class count: one line
        widths = ck["arch"].get("group_widths")  # a merged network's (``record.upgrade``)
        net = load_into(unwrap(model), ck["state_dict"], str(path), resize=True, widths=widths)
        if widths:  # saved again, it keeps them
            net.arch = dict(ck["arch"])
        return net.eval()
    from ..models.custom import trust as trust_targets

    trust_targets(*trust)
    return model_from_checkpoint(ck, str(path)).eval()
