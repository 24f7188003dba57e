"""C-SGD in a Lightning ``Trainer``: ``CSGDCallback`` (``pip install "csgd[lightning]"``).

    from csgd_cli.lightning import CSGDCallback      # or csgd_cli.api.lightning
    cb = CSGDCallback(example_input=x, ratio=0.5, epsilon=3e-3)
    L.Trainer(callbacks=[cb], ...).fit(module, data)
    thin = cb.merge()                                # the thin network, same function

At the start of fit the callback builds the pruner over the LightningModule (or its
``module`` submodule), wraps every optimizer ``configure_optimizers`` returned
(``CSGD.wrap``: any optimizer, its schedulers untouched), and logs chi, its relative
value and a forecast of the steps left to an exact merge through the Trainer's logger
(``csgd/...``, every ``log_every_n_steps``). Its clusters ride in Lightning's
checkpoints (``state_dict``), so ``fit(ckpt_path=...)`` resumes the same C-SGD. Under
DDP rank 0's clusters are broadcast to every rank.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..common.errors import CsgdError
from .callbacks import PrunerCallback, check_schedule

try:
    import lightning.pytorch as _pl

    _Base: Any = _pl.Callback
except ImportError:  # refused when the callback is made, with the install line
    _pl, _Base = None, object


class CSGDCallback(PrunerCallback, _Base):  # type: ignore[misc]
    """C-SGD for a Lightning ``Trainer``; the arguments: ``callbacks.PrunerCallback``
    (``module``: a submodule of the LightningModule)."""

    framework, package = _pl, "lightning"
    _restored: dict[str, Any] | None = None  # the clusters of the checkpoint resumed from

    # -- fit -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        clusters = self._restored["clusters"] if self._restored else None
        if clusters is None and trainer.world_size > 1:  # rank 0 chooses; all use its clusters
            mine = self.settings.build(pl_module) if trainer.is_global_zero else None
            clusters = trainer.strategy.broadcast(mine.clusters if mine else None, src=0)
            self.pruner = mine or self.settings.build(pl_module, clusters)
        else:
            self.pruner = self.settings.build(pl_module, clusters)
        for opt in trainer.optimizers:
            self._wrap(opt)
        if clusters is None and trainer.is_global_zero:  # a fresh start: the whole schedule
            s = self.settings
            check_schedule(
                trainer.optimizers, trainer.estimated_stepping_batches, s.epsilon, s.norm_epsilon
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.log_chi or self.pruner is None or step % max(trainer.log_every_n_steps, 1):
            return
        for k, v in self._chi(self.pruner, step).items():
            pl_module.log(k, v, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from ..core.wrap import wrapped

        for opt in trainer.optimizers:  # the optimizers are plain again after fit
            w = wrapped(opt)
            if w is not None:
                w.remove()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return dict(self._restored or {})
        return {"clusters": self.pruner.clusters, "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # -- after fit -----------------------------------------------------------------------------
    def merge(
        self, example_input: Any = None, *, tolerance: float = 1e-4, force: bool = False
    ) -> nn.Module:
        """The thin network (``CSGD.merge``): the pruned module, physically thinner."""
        if self.pruner is None:
            raise CsgdError("the callback has not run a fit yet", "call trainer.fit(...) first")
        net = self.pruner.model
        trainer = getattr(net, "_trainer", None)
        if trainer is not None:  # a LightningModule: its trainer is not copied with it
            net._trainer = None
        try:
            return self.pruner.merge(example_input, tolerance=tolerance, force=force)
        finally:
            if trainer is not None:
                net._trainer = trainer
