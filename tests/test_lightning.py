"""C-SGD in a real Lightning Trainer (CPU): fit, chi in the logger, an exact merge; a run
killed and resumed from Lightning's checkpoint equals one run; DDP on two processes
(a missing lightning: ``test_callbacks``)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")
from csgd_cli.lightning import CSGDCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
KW = {"ratio": 0.5, "epsilon": 3.0, "norm_epsilon": 3.0}


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 4),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.9)}


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(
        torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    )
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def trainer(root: Path, epochs: int, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
        logger=L.loggers.CSVLogger(root), log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, **kw,
    )  # fmt: skip


def test_fit_logs_chi_and_merges_exactly(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    cb = CSGDCallback(example_input=x, **KW)
    module = Tiny()
    trainer(tmp_path, 15, [cb], enable_checkpointing=False).fit(module, loader())
    assert cb.pruner is not None and cb.pruner.widths == {"net.0": 4, "net.3": 4}
    thin = cb.merge(tolerance=1e-5)
    assert cb.pruner.merge_report["top1_agreement"] == 1.0
    assert thin.net[0].out_channels == 4 and thin.net[3].out_channels == 4
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    chi = [float(r["csgd/chi_relative"]) for r in rows if r.get("csgd/chi_relative")]
    assert len(chi) >= 10 and chi[-1] < 1e-6 * chi[0]  # logged, and falling
    assert any(r.get("csgd/steps_to_merge") for r in rows)  # the forecast


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 3:
            raise RuntimeError("killed")


def test_killed_and_resumed_equals_one_run(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    one = Tiny()
    trainer(tmp_path / "one", 6, [CSGDCallback(x, **KW)], enable_checkpointing=False).fit(
        one, loader()
    )
    ck = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path / "a", 6, [CSGDCallback(x, **KW), ck, Crash()]).fit(Tiny(), loader())
    again, cb = Tiny(), CSGDCallback(x, **KW)
    ck2 = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck2")
    trainer(tmp_path / "b", 6, [cb, ck2]).fit(
        again, loader(), ckpt_path=tmp_path / "ck" / "last.ckpt"
    )
    for (k, a), b in zip(one.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_on_two_processes(tmp_path: Path) -> None:
    """Lightning's DDP strategy (gloo, 2 CPU processes): rank 0's clusters on both ranks,
    the same parameters after fit (BN running statistics are per rank), an exact merge."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run([sys.executable, str(HERE / "lightning_ddp.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["clusters"] == r1["clusters"]
    for k, v in r0["state"].items():
        torch.testing.assert_close(v, r1["state"][k], msg=k)
    assert r0["top1_agreement"] == 1.0
