"""C-SGD in any training loop: the public API (the CLI's stages use it too).

    import csgd_cli as csgd
    pruner = csgd.CSGD(model, example_input, ratio=0.625, epsilon=3e-3)
    opt = pruner.optimizer(lr=0.01, momentum=0.9, weight_decay=1e-4)
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

from ..common.errors import CsgdError
from ..common.nets import run_model
from ..core.chi import chi_report
from ..core.clustering import check_method, cluster_groups, target_widths
from ..core.optim import CentripetalSGD
from ..core.surgery import merge_checked
from ..deploy.latency import Runtime
from ..rules.groups import ChannelGroup, Clusters, check_clusters, describe, select_groups
from ..targets.widths import Problem, choose, parse_target
from ..tracing.trace import channel_groups, example_input
from .checkpoint import (
    USER_ARCH,
    load_checkpoint,
    load_into,
    model_from_checkpoint,
    save_checkpoint,
)

STATE_FORMAT = 1  # CSGD.state_dict() layout


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper or ``torch.compile`` holds (the one whose layers change)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class CSGD:
    """Channel groups, clusters and the centripetal optimizer of one network.

    ``ratio``: clusters per group = round(ratio x original width) (``round_to``: a
    multiple of it). ``target`` instead (``"flops:0.45"``, ``"params:0.5"``,
    ``"latency:0.5"``): per-group widths chosen by ``rule`` to keep that fraction of the
    model's cost (``base_cost``: of that absolute cost instead, for iterative rounds),
    none narrower than ``min_width`` (default max(round_to, 4)); a latency target is
    timed in ``backend`` at ``latency_batch`` with ``latency_threads``, the timings kept
    under ``cache_dir``; ``target_report`` says what was reached.
    ``include``/``exclude``: globs over group names (``describe()`` lists them).
    ``clusters``: reuse saved ones (``pruner.clusters`` of an earlier run).
    ``norm_epsilon``: the pull on norm gamma/beta and biases (default 0.1 x epsilon).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        ratio: float | None = None,
        epsilon: float = 3e-3,
        norm_epsilon: float | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        round_to: int = 1,
        clustering: str = "kmeans",
        seed: int = 0,
        clusters: Clusters | None = None,
        base_widths: dict[str, int] | None = None,
        target: str | None = None,
        min_width: int | None = None,
        rule: str = "distortion",
        backend: str = "eager",
        latency_batch: int = 1,
        latency_threads: int | None = None,
        cache_dir: str | Path | None = None,
        base_cost: float | None = None,
    ) -> None:
        if target is not None and ratio is not None:
            raise CsgdError(f"ratio={ratio} and target={target!r} both given", "pass one of them")
        ratio = 0.625 if ratio is None and target is None else ratio
        if ratio is not None and not 0 < ratio <= 1:
            raise CsgdError(f"ratio={ratio} is out of range", "pass 0 < ratio <= 1")
        if epsilon < 0 or (norm_epsilon is not None and norm_epsilon < 0):
            raise CsgdError("epsilon and norm_epsilon must be >= 0", "pass a value >= 0")
        if round_to < 1:
            raise CsgdError(f"round_to={round_to} is out of range", "pass round_to >= 1")
        check_method(clustering)
        self.model = unwrap(model)
        self.example_input = example_input
        self.epsilon, self.norm_epsilon = float(epsilon), norm_epsilon
        self.settings = {
            "ratio": ratio,
            "target": None if target is None else parse_target(target).spec,
            "min_width": min_width,
            "rule": rule,
            "include": list(include),
            "exclude": list(exclude),
            "round_to": round_to,
            "clustering": clustering,
            "seed": seed,
        }
        self.groups: list[ChannelGroup] = channel_groups(self.model, example_input)
        self.base_widths = dict(base_widths or {g.name: g.width for g in self.groups})
        self.target_report: dict[str, Any] | None = None
        if clusters is not None:
            clusters = {k: [list(map(int, c)) for c in v] for k, v in dict(clusters).items()}
            check_clusters(self.groups, clusters, "clusters=")
            self.clusters: Clusters = clusters
        else:
            chosen = select_groups(self.groups, include, exclude)
            if target is not None:
                x = example_input if example_input is not None else example_input_for(self.model)
                problem = Problem(
                    self.model, self.groups, [g.name for g in chosen], x, round_to,
                    min_width or max(round_to, 4),
                    Runtime(backend, latency_batch, latency_threads),
                    Path(cache_dir) if cache_dir is not None else None,
                )  # fmt: skip
                choice = choose(
                    problem, parse_target(target), rule, seed, self.base_widths, base_cost
                )
                ks, self.target_report = choice.widths, choice.report
            else:
                ks = target_widths(chosen, ratio, self.base_widths, round_to)
            self.clusters = cluster_groups(self.model, chosen, ks, clustering, seed)
        self.merge_report: dict[str, Any] | None = None

    # -- what the pruner knows --------------------------------------------------------
    @property
    def widths(self) -> dict[str, int]:
        """Width of every pruned group after the merge (its number of clusters)."""
        return {name: len(cl) for name, cl in self.clusters.items()}

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
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        plain_norm_weight_decay: float | None = None,
    ) -> CentripetalSGD:
        """The C-SGD optimizer over every parameter of the model (a torch Optimizer:
        learning-rate schedulers, GradScaler and DDP work with it)."""
        return CentripetalSGD(
            self.model,
            self.groups,
            self.clusters,
            lr=lr,
            epsilon=self.epsilon,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
            norm_epsilon=self.norm_epsilon,
            plain_norm_weight_decay=plain_norm_weight_decay,
        )

    def chi_report(self, affine: bool = False) -> dict[str, Any]:
        """Chi in total, relative to the kernels' squared norm, the largest deviation,
        and per group (``affine``: norm gamma/beta and biases included)."""
        return chi_report(self.model, self.groups, self.clusters, affine)

    def chi(self) -> float:
        """The kernel deviation: sum over clusters of ||K_i - mean K||^2 (falls to 0)."""
        return float(self.chi_report()["chi"])

    def ready(self, tolerance: float = 1e-8) -> bool:
        """True when kernels and norm parameters have collapsed to their cluster centres
        (relative chi at most ``tolerance``): the merge is then exact."""
        worst = max(self.chi_report()["relative"], self.chi_report(affine=True)["relative"])
        return worst <= tolerance

    # -- the merge ----------------------------------------------------------------------
    def merge(
        self, example_input: Any = None, *, tolerance: float = 1e-4, force: bool = False
    ) -> nn.Module:
        """The physically thinner network (the same class, its layers resized), checked
        against the trained one on ``example_input`` (default: the pruner's): every
        output within ``tolerance`` (relative) or refused unless ``force``. The report
        is kept in ``merge_report``."""
        x = example_input if example_input is not None else self.example_input
        if x is None:
            x = example_input_for(self.model)
        thin, rep = merge_checked(
            self.model, self.groups, self.clusters, x, tolerance=tolerance, force=force
        )
        self.merge_report = rep
        return thin

    # -- the user's own checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (clusters, epsilon, widths, settings) to resume with ``from_state_dict``."""
        return {
            "format": STATE_FORMAT,
            "clusters": self.clusters,
            "epsilon": self.epsilon,
            "norm_epsilon": self.norm_epsilon,
            "base_widths": self.base_widths,
            **self.settings,
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
        keys = ("include", "exclude", "round_to", "clustering", "seed")
        return cls(
            model,
            example_input,
            epsilon=state["epsilon"],
            norm_epsilon=state["norm_epsilon"],
            clusters=state["clusters"],
            base_widths=state["base_widths"],
            # the clusters fix the widths: the target that chose them is only recorded
            ratio=None if state.get("target") else state["ratio"],
            target=state.get("target"),
            min_width=state.get("min_width"),
            rule=state.get("rule", "distortion"),
            **{k: state[k] for k in keys},
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
    arch = getattr(net, "arch", None) or {
        "name": USER_ARCH,
        "class": f"{type(net).__module__}.{type(net).__qualname__}",
    }
    info = {"arch": arch, "group_widths": getattr(net, "group_widths", None), **extra}
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
        net = load_into(unwrap(model), ck["state_dict"], str(path), resize=True)
        if ck.get("group_widths"):
            net.group_widths = dict(ck["group_widths"])
        return net.eval()
    from ..models.custom import trust as trust_targets

    trust_targets(*trust)
    return model_from_checkpoint(ck, str(path)).eval()
