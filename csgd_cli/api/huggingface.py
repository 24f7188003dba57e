"""C-SGD in a transformers ``Trainer``: ``CSGDCallback`` (``pip install "csgd[hf]"``).

    from csgd_cli.huggingface import CSGDCallback    # or csgd_cli.api.huggingface
    cb = CSGDCallback(example_input={"input_ids": ids}, ratio=0.5, epsilon=3e-3)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    thin = cb.merge()                                # the thin network, same function

At the start of training the callback builds the pruner over the Trainer's model and
wraps the optimizer the Trainer made (its own, with its schedule: ``CSGD.wrap``). Chi,
its relative value and a forecast of the steps left to an exact merge join the Trainer's
logs (``csgd/...``) every ``logging_steps``. The clusters are saved in each checkpoint's
trainer state, and ``train(resume_from_checkpoint=...)`` takes them from there (leave
``restore_callback_states_from_checkpoint`` off: the callback reads them itself).
Under DDP (``torchrun``) rank 0 chooses the clusters and every rank takes them.
Example inputs may be a tensor, a tuple of positional arguments or a dict of keyword
arguments, as transformers models take them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from .callbacks import PrunerCallback, check_schedule

try:
    import transformers as _tf

    _Bases: tuple[Any, ...] = (_tf.TrainerCallback, _tf.trainer_callback.ExportableState)
except ImportError:  # refused when the callback is made, with the install line
    _tf, _Bases = None, (object,)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (whose ``step`` calls its ``step``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class CSGDCallback(PrunerCallback, *_Bases):  # type: ignore[misc]
    """C-SGD for a transformers ``Trainer``; the arguments: ``callbacks.PrunerCallback``
    (``module``: a submodule of the model)."""

    framework, package = _tf, "transformers"
    _pending: dict[str, float] | None = None  # chi to add to the next logs

    # -- training ----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model, optimizer = kw.get("model"), kw.get("optimizer")
        if model is None or optimizer is None:
            raise CsgdError("the Trainer passed no model or optimizer", "use transformers.Trainer")
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        clusters = ((saved or {}).get("attributes") or {}).get("clusters") or None
        if clusters is None and _world_size() > 1:  # rank 0 chooses; every rank uses its
            mine = self.settings.build(model) if args.process_index == 0 else None
            box = [mine.clusters if mine is not None else None]
            torch.distributed.broadcast_object_list(box, src=0)
            self.pruner = mine or self.settings.build(model, box[0])
        else:
            self.pruner = self.settings.build(model, clusters)
        self._wrap(_innermost(optimizer))
        if clusters is None and state.is_world_process_zero:  # a fresh start: the whole schedule
            s = self.settings
            check_schedule([_innermost(optimizer)], state.max_steps, s.epsilon, s.norm_epsilon)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        every = max(int(getattr(args, "logging_steps", 1) or 1), 1)
        if self.log_chi and self.pruner is not None and state.global_step % every == 0:
            self._pending = self._chi(self.pruner, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)  # the callbacks after this one (printer, ...) see it
            if state.log_history:
                state.log_history[-1].update(self._pending)  # and trainer_state.json
            self._pending = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        from ..core.wrap import wrapped

        opt = kw.get("optimizer")
        w = wrapped(_innermost(opt)) if opt is not None else None
        if w is not None:  # the optimizer is plain again after training
            w.remove()

    # -- checkpoints: the clusters in the trainer state -----------------------------------------
    def state(self) -> dict[str, Any]:
        clusters = self.pruner.clusters if self.pruner is not None else None
        return {"args": {}, "attributes": {"clusters": clusters}}

    # -- after training --------------------------------------------------------------------------
    def merge(
        self, example_input: Any = None, *, tolerance: float = 1e-4, force: bool = False
    ) -> nn.Module:
        """The thin network (``CSGD.merge``): the pruned model, physically thinner."""
        if self.pruner is None:
            raise CsgdError("the callback has not trained yet", "call trainer.train() first")
        return self.pruner.merge(example_input, tolerance=tolerance, force=force)
