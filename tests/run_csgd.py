"""``csgd`` as the tests launch it (alone or under torchrun): the CLI, plus what a test
asks of it through the environment, added from outside the library.

- ``CSGD_TEST_DTYPE=float64``: torch's default dtype, so models and data are float64
  (1- and 2-process runs then agree to rounding; float32 runs of tiny nets are chaotic).
- ``CSGD_TEST_FAIL=<rank>:<step>``: that rank raises at that global step, through the
  training loop's step hooks (``engine.STEP_HOOKS``).
"""

from __future__ import annotations

import os
import sys

import torch

from csgd_cli.runner import cli, distributed, engine

FAIL = "CSGD_TEST_FAIL: rank failed on purpose at step"


def _fail_at(rank: int, step: int) -> engine.StepHook:
    def hook(trainer: engine.Trainer, gstep: int) -> None:
        del trainer
        if (distributed.rank_world()[0], gstep) == (rank, step):
            raise RuntimeError(f"{FAIL} {gstep}")

    return hook


if __name__ == "__main__":
    if os.environ.get("CSGD_TEST_DTYPE"):
        torch.set_default_dtype(getattr(torch, os.environ["CSGD_TEST_DTYPE"]))
    if os.environ.get("CSGD_TEST_FAIL"):
        rank, step = (int(v) for v in os.environ["CSGD_TEST_FAIL"].split(":"))
        engine.STEP_HOOKS.append(_fail_at(rank, step))
    cli.main(sys.argv[1:])
