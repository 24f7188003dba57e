"""The GPU paths, checked on a real GPU in one go (under 8 minutes on one GPU).

    python scripts/gpu_check.py            # prints one JSON line

- C-SGD training of a ResNet-56 on CIFAR-sized synthetic data in bf16 and in fp16 AMP
  (fp16 through ``FlatGradScaler``, whose unscale is one kernel over the optimizer's
  flat gradient buffer): finite loss and weights, chi falling, the scale kept;
- channels_last inputs and weights against the default layout, and ``compile=true``
  (``torch.compile`` of the forward/backward) against eager: seconds per epoch;
- a 1-GPU NCCL job through torchrun (``csgd train`` under ``torch.distributed.run``);
- the time of one ResNet-56 C-SGD epoch (50,000 CIFAR-sized images) at batch 64 and 512.

On a machine without CUDA it says so and exits 0 (``--cpu-smoke`` runs the same epochs,
tiny, on the CPU: a check of this script itself).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import csgd_cli as csgd
from csgd_cli.common.config import ScheduleConf
from csgd_cli.core.chi import chi_fn
from csgd_cli.runner.datasets import build_data
from csgd_cli.runner.engine import Trainer


def epoch(
    batch: int,
    num_train: int,
    *,
    half: torch.dtype = torch.bfloat16,
    channels_last: bool = True,
    compile: bool = False,
    dev: torch.device | None = None,
) -> dict[str, Any]:
    """One C-SGD epoch of a ResNet-56 (ratio 5/8, eps 3e-3) on synthetic 32x32 images."""
    dev = dev or torch.device("cuda")
    torch.manual_seed(0)
    data_cfg = OmegaConf.create(
        {"name": "synthetic", "num_train": num_train, "num_test": 512, "batch_size": batch}
    )
    data = build_data(data_cfg, seed=0, device=dev)
    model = csgd.get_model("resnet56", num_classes=10, in_channels=3).to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pruner = csgd.CSGD(model, ratio=0.625)
    opt = pruner.optimizer(lr=0.03, epsilon=3e-3, momentum=0.9, weight_decay=1e-4)
    sched = OmegaConf.structured(ScheduleConf(epochs=1, milestones=[], log_every=0))
    chi = chi_fn(model, pruner.groups, pruner.clusters)
    chi0 = chi()[0].item()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model, data, sched, opt, device=dev, out=Path(out), phase="train", payload={},
            amp=True, compile=compile, channels_last=channels_last, half=half, chi_fn=chi,
        )  # fmt: skip
        sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
        sync()
        t = time.perf_counter()
        rec = trainer.fit()
        sync()
        secs = time.perf_counter() - t
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {
        "batch": batch,
        "images": num_train,
        "seconds": round(secs, 2),
        "images_per_s": round(num_train / secs, 1),
        "train_loss": round(rec["train_loss"], 4),
        "finite": finite and math.isfinite(rec["train_loss"]),
        "chi_before": chi0,
        "chi_after": rec["chi"],
        "scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None,
    }


def nccl_job() -> dict[str, Any]:
    """``csgd train`` as a 1-GPU torchrun job with the NCCL backend."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "csgd_cli", "train", "model=resnet20", "dataset=synthetic",
            "dataset.num_train=1024", "dataset.num_test=256", "dataset.batch_size=128",
            "device=cuda", "dist.backend=nccl", "dist.sync_bn=true", "schedule.epochs=1",
            "prune.force=true",  # one epoch cannot converge: the forecast would refuse it
            f"hydra.run.dir={out}",
        ]  # fmt: skip
        t = time.perf_counter()
        p = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "CSGD_NO_BAR": "1"}
        )
        ok = p.returncode == 0 and (Path(out) / "last.pt").is_file()
        return {
            "ok": ok,
            "seconds": round(time.perf_counter() - t, 1),
            "tail": "" if ok else p.stderr[-600:],
        }


def main() -> None:
    if "--cpu-smoke" in sys.argv:
        cpu = torch.device("cpu")
        runs = [epoch(16, 32, dev=cpu), epoch(16, 32, dev=cpu, half=torch.float16)]
        print(json.dumps({"cuda": False, "cpu_smoke": runs}))
        return
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device here: nothing to check"}))
        return
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "cuda": True,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    res["bf16_amp"] = epoch(128, 8192, half=torch.bfloat16)
    res["fp16_amp_flat_scaler"] = epoch(128, 8192, half=torch.float16)
    res["contiguous_layout"] = epoch(128, 8192, channels_last=False)
    res["compiled"] = epoch(128, 8192, compile=True)
    res["nccl_torchrun"] = nccl_job()
    res["resnet56_epoch_batch64"] = epoch(64, 50000)
    res["resnet56_epoch_batch512"] = epoch(512, 50000)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    checks = [res[k]["finite"] for k in res if isinstance(res[k], dict) and "finite" in res[k]]
    res["ok"] = all(checks) and res["nccl_torchrun"]["ok"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
