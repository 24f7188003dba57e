"""``csgd`` as the tests launch it (alone or under torchrun): the CLI, plus what a test
asks of it through the environment, added from outside the library.

- ``CSGD_TEST_DTYPE=float64``: torch's default dtype, so models and data are float64
  (1- and 2-process runs then agree to rounding; float32 runs of tiny nets are chaotic).
- ``CSGD_TEST_FAIL=<rank>:<step>``: that rank raises once it has taken that global step
  (the training loop's ``Trainer.train_step`` is wrapped here, from outside the library).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from csgd_cli.runner import cli, distributed, engine

FAIL = "CSGD_TEST_FAIL: rank failed on purpose at step"


def _fail_at(rank: int, step: int) -> None:
    """Make ``rank`` raise right after it has taken global step ``step``."""
    real = engine.Trainer.train_step

    def train_step(self: engine.Trainer, x: torch.Tensor, y: torch.Tensor) -> Any:
        out = real(self, x, y)
        gstep = self.epoch * self.steps + self.step_in_epoch + 1  # the step just taken
        if (distributed.rank_world()[0], gstep) == (rank, step):
            raise RuntimeError(f"{FAIL} {gstep}")
        return out

    engine.Trainer.train_step = train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("CSGD_TEST_DTYPE"):
        torch.set_default_dtype(getattr(torch, os.environ["CSGD_TEST_DTYPE"]))
    if os.environ.get("CSGD_TEST_FAIL"):
        rank, step = (int(v) for v in os.environ["CSGD_TEST_FAIL"].split(":"))
        _fail_at(rank, step)
    cli.main(sys.argv[1:])
