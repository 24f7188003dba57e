"""What stops a training phase before it spoils a checkpoint: a loss, chi or weight that
became non-finite (the run diverged: lower the rate), or a NaN/inf input (its samples
are named). Every stop is one ``CsgdError`` that says whether ``last.pt`` was kept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError


class Guard:
    """The checks of one phase. ``csgd``: a C-SGD phase (its rate is ``schedule.lr``, and
    epsilon may be the cause); ``sync_free`` (a GPU): inputs are checked on the device,
    the first bad step noted there and read at the next guard, with no host sync per step."""

    def __init__(
        self, phase: str, out: Path, data: Any, steps: int, csgd: bool, sync_free: bool
    ) -> None:
        self.phase, self.out, self.data, self.steps, self.csgd = phase, out, data, steps, csgd
        self.sync_free = sync_free
        self._bad_step: torch.Tensor | None = None  # the first step with a NaN/inf input

    def loss(self, loss: float, chi: float | None, epoch: int, step: int) -> None:
        """Stop on a non-finite loss or chi (and on a bad input noted on the device)."""
        self.inputs_ok()
        if not math.isfinite(loss) or (chi is not None and not math.isfinite(chi)):
            self._diverged("loss" if not math.isfinite(loss) else "chi", epoch, step)

    def weights(self, model: nn.Module, epoch: int, step: int) -> None:
        """Refuse to go on (or to checkpoint) once a weight or running stat is inf/NaN."""
        self.inputs_ok()
        ts = [t for t in model.state_dict().values() if t.is_floating_point()]
        if ts and not bool(torch.stack([torch.isfinite(t).all() for t in ts]).all()):
            self._diverged("the weights", epoch, step)

    def check_input(self, x: torch.Tensor, gstep: int) -> None:
        """A NaN/inf input would make every weight NaN: stop at its batch, on the CPU before
        the step; on a GPU when the next guard reads its note."""
        ok = torch.isfinite(x.sum())  # one pass, no mask: ~20x cheaper than isfinite(x).all()
        if self.sync_free:
            first = torch.tensor(-1, device=x.device) if self._bad_step is None else self._bad_step
            self._bad_step = torch.where(ok | (first >= 0), first, gstep)
        elif not ok:
            self._bad_input(gstep, x)

    def inputs_ok(self) -> None:
        if self._bad_step is not None and (gstep := int(self._bad_step.item())) >= 0:
            self._bad_input(gstep, None)

    def _diverged(self, what: str, epoch: int, step: int) -> None:
        # C-SGD phases are named train, train_r1, ...; their schedule is `schedule`.
        lr_key = "schedule.lr" if self.csgd else f"{self.phase}.lr"
        raise CsgdError(
            f"training diverged: {what} became non-finite (inf/NaN) in phase {self.phase} at "
            f"epoch {epoch} step {step}; {self._kept()}",
            f"lower {'epsilon or ' if self.csgd else ''}{lr_key} (e.g. 10x smaller) and run again",
        )

    def _kept(self) -> str:
        last = self.out / "last.pt"
        kept = f"the last good checkpoint {last} is kept"
        return kept if last.is_file() else "no checkpoint was written"

    def _bad_input(self, gstep: int, x: torch.Tensor | None) -> None:
        epoch, step = divmod(gstep - 1, self.steps)
        bad = self.data.nonfinite_samples(epoch, step, x)  # x None: made again (GPU)
        if not bad:  # the sum overflowed on huge finite values: nothing is wrong
            self._bad_step = None
            return
        raise CsgdError(
            f"non-finite input (NaN/inf) in phase {self.phase} at epoch {epoch} step {step + 1}"
            f" (global step {gstep}): its batch holds training samples {bad} of data set "
            f"{self.data.info.name}; {self._kept()}",
            "fix or remove those images (NaN/inf pixels) and run again",
        )
