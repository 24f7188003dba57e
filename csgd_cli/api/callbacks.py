"""What the trainer callbacks (``api.lightning``, ``api.huggingface``) share: their
constructor (``PrunerCallback``), the pruner's settings, building it over the trainer's
module, the example input on its device, the chi log with its forecast, and the refusal
of a missing extra."""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..common.config import EPSILON, NORM_EPSILON_SHARE
from ..common.errors import CsgdError
from ..core.forecast import forecast, round_up
from .pruner import CSGD

EXTRAS = {"lightning": "lightning", "transformers": "hf"}


def missing(package: str) -> CsgdError:
    """The one-line refusal of a missing extra, with its install line."""
    top = package.split(".")[0]
    return CsgdError(
        f"{top} is not installed", f'install the extra: pip install "csgd[{EXTRAS.get(top, top)}]"'
    )


def require(package: str) -> Any:
    """``package`` imported, or ``missing(package)`` raised."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise missing(package) from None


def to_device(x: Any, device: torch.device) -> Any:
    """An example input (tensor, tuple/list or dict of them) on ``device``."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


class Settings:
    """The pruner's settings a callback is given: ``kwargs`` for ``CSGD`` (its widths,
    groups, clustering, seed), the optimizer's pull, the submodule pruned."""

    def __init__(
        self,
        example_input: Any,
        kwargs: dict[str, Any],
        epsilon: float,
        norm_epsilon: float | None,
        module: str | None,
    ) -> None:
        if epsilon < 0 or (norm_epsilon is not None and norm_epsilon < 0):
            raise CsgdError("epsilon and norm_epsilon must be >= 0", "pass a value >= 0")
        self.example_input = example_input
        self.kwargs = kwargs
        self.epsilon = float(epsilon if epsilon is not None else EPSILON)
        self.norm_epsilon = norm_epsilon
        self.module = module

    def target_of(self, root: nn.Module) -> nn.Module:
        """The module pruned: ``root`` or its ``module`` submodule (e.g. ``"model"``)."""
        return root.get_submodule(self.module) if self.module else root

    def build(self, root: nn.Module, clusters: Any = None) -> CSGD:
        """The pruner over ``root``'s module (``clusters``: a checkpoint's, or rank 0's)."""
        net = self.target_of(root)
        p = next(net.parameters())
        x = to_device(self.example_input, p.device)
        if clusters is not None:
            return CSGD(net, x, clusters=clusters, clustering=self.kwargs["clustering"])
        return CSGD(net, x, **self.kwargs)


def check_schedule(
    optimizers: Sequence[torch.optim.Optimizer],
    steps: float,
    epsilon: float,
    norm_epsilon: float | None,
    tolerance: float = 1e-4,
) -> str | None:
    """Before training: warn (and return the line) when even the optimizers' first
    learning rate on every one of ``steps`` steps cannot pull the clusters to
    ``tolerance``. The wrapped pull shrinks a cluster's differences by ``1 - lr (weight
    decay + epsilon)`` a step whatever the optimizer (``core.wrap``), and a schedule only
    lowers the rate, so this is the best case: what it misses, no schedule reaches."""
    groups = [g for opt in optimizers for g in opt.param_groups]
    if not groups or not steps or not math.isfinite(steps):
        return None
    lr = max(float(g.get("initial_lr", g["lr"])) for g in groups)
    wd = max(float(g.get("weight_decay", 0.0)) for g in groups)
    neps = NORM_EPSILON_SHARE * epsilon if norm_epsilon is None else norm_epsilon
    f = forecast(
        [lr] * int(steps), 0.0, False, wd, epsilon, norm_epsilon=neps, norm_weight_decay=wd
    )
    if lr <= 0 or f.worst <= tolerance:
        return None
    need = (1 - tolerance ** (1 / int(steps))) / lr - wd  # (1 - lr c)^steps = tolerance
    line = (
        f"csgd: C-SGD cannot reach the merge tolerance {tolerance:g} in {int(steps)} steps, "
        f"even at lr {lr:g} throughout: within-cluster differences fall to {f.kernel:.1e} "
        f"(kernels) and {f.affine:.1e} (norms) at best; epsilon={round_up(need)} "
        f"norm_epsilon={round_up(need)} or more steps would"
    )
    warnings.warn(line, stacklevel=3)
    return line


class ChiLog:
    """Chi (relative to the kernels' norm) over steps, and a forecast of the steps left
    until the merge is exact (relative chi at ``tolerance``), from the decay observed
    since the previous point (chi falls geometrically under C-SGD)."""

    def __init__(self, tolerance: float = 1e-8) -> None:
        self.tolerance = tolerance
        self.last: tuple[int, float] | None = None

    def __call__(self, pruner: CSGD, step: int) -> dict[str, float]:
        rep = pruner.chi_report()
        rel = float(rep["relative"])
        out = {"csgd/chi": float(rep["chi"]), "csgd/chi_relative": rel}
        if self.last is not None and step > self.last[0] and 0 < rel < self.last[1]:
            rate = math.log(rel / self.last[1]) / (step - self.last[0])  # log decay per step
            out["csgd/steps_to_merge"] = max(0.0, math.log(self.tolerance / rel) / rate)
        self.last = (step, rel)
        return out


class PrunerCallback:
    """The constructor both trainer callbacks share: ``CSGD``'s width settings
    (``ratio`` | ``target`` | ``widths``, ``include``/``exclude``, ``clustering``,
    ``seed``), the pull (``epsilon``, ``norm_epsilon``), ``module``: a submodule's name to
    prune instead of the whole model; ``log_chi``: log chi (default True). A subclass
    names its framework (``framework``: the module, None when it is not installed) and
    the package to install (``package``)."""

    framework: Any = None
    package = ""

    def __init__(
        self,
        example_input: Any = None,
        *,
        ratio: float | None = None,
        target: str | None = None,
        widths: Any = None,
        epsilon: float = EPSILON,
        norm_epsilon: float | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        clustering: str = "kmeans",
        seed: int = 0,
        module: str | None = None,
        log_chi: bool = True,
    ) -> None:
        if self.framework is None:
            raise missing(self.package)
        super().__init__()  # the framework's callback base
        pruner = dict(ratio=ratio, target=target, widths=widths, include=include)
        pruner.update(exclude=exclude, clustering=clustering, seed=seed)
        self.settings = Settings(example_input, pruner, epsilon, norm_epsilon, module)
        self.pruner: CSGD | None = None
        self.log_chi = log_chi
        self._chi = ChiLog()

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """C-SGD on the trainer's ``optimizer`` (``CSGD.wrap``), with the settings' pull."""
        assert self.pruner is not None
        s = self.settings
        self.pruner.wrap(optimizer, epsilon=s.epsilon, norm_epsilon=s.norm_epsilon)
