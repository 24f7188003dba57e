"""The training loop (``csgd_cli.runner.engine.Trainer``): its steps and logs, the format
of the checkpoints it writes and resumes from, and non-finite inputs."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from csgd_cli.common.errors import CsgdError


def _trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Any = None, log_every: int = 0
) -> Any:
    from csgd_cli.models import get_model
    from csgd_cli.runner.engine import Trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # no TensorBoard: faster

    model = get_model("resnet20", num_classes=10, in_channels=1, widths=[4] * 3 + [8] * 9)
    sched = SimpleNamespace(
        epochs=1,
        warmup_epochs=0,
        milestones=[],
        kind="multistep",
        gamma=0.1,
        log_every=log_every,
        eval_every=1,
    )
    data = data or SimpleNamespace(steps_per_epoch=lambda: 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Trainer(
        model,
        data,
        sched,
        opt,
        device=torch.device("cpu"),
        out=tmp_path,
        phase="pretrain",
        payload={"arch": model.arch},
        amp=False,
    )


def test_the_loop_takes_every_step_of_an_epoch_and_logs_each(tmp_path: Path) -> None:
    """32 images in batches of 8: steps 1 to 4 are logged in order, then the epoch."""
    from csgd_cli.common.config import ScheduleConf
    from csgd_cli.common.files import read_jsonl
    from csgd_cli.core.optim import plain_sgd
    from csgd_cli.models import get_model
    from csgd_cli.runner import datasets, engine

    data = datasets.build_data(
        OmegaConf.create({"name": "synthetic", "num_train": 32, "num_test": 8, "batch_size": 8}),
        seed=0,
        device=torch.device("cpu"),
    )
    model = get_model("resnet20", widths=[2] * 12)
    sched = OmegaConf.structured(ScheduleConf(epochs=1, milestones=[], log_every=1))
    kw = {"device": torch.device("cpu"), "out": tmp_path, "phase": "pretrain"}
    arch = {"arch": model.arch}
    t = engine.Trainer(model, data, sched, plain_sgd(model, sched), payload=arch, **kw)
    t.fit()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert recs[-1]["step"] == 4 and recs[-1]["epoch"] == 1 and "train_loss" in recs[-1]
    assert (t.epoch, t.step_in_epoch) == (1, 0)


# -- checkpoint format versions ------------------------------------------------------------
def test_checkpoints_carry_a_format_and_other_formats_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csgd_cli.api.checkpoint import FORMAT, load_checkpoint

    trainer = _trainer(tmp_path, monkeypatch)
    trainer.save("last.pt")
    ck = load_checkpoint(tmp_path / "last.pt", "run")
    assert ck["format"] == FORMAT == 3
    trainer.restore(ck)  # this version's own file resumes
    newer, older = tmp_path / "newer.pt", tmp_path / "older.pt"
    torch.save({**ck, "format": 4, "weights": ck["state_dict"]}, newer)
    with pytest.raises(CsgdError) as e:
        load_checkpoint(newer)
    assert str(e.value).startswith(
        f"ckpt={newer} was written by a newer csgd (checkpoint format 4; this csgd reads "
        "formats 1 to 3); upgrade csgd"
    )
    old = {k: v for k, v in ck.items() if k not in ("optimizer", "format")}
    torch.save({**old, "format": 1}, older)
    old_ck = load_checkpoint(older, "run")  # a model of an older csgd still loads ...
    with pytest.raises(CsgdError) as e:  # ... but cannot resume without its optimizer
        trainer.restore(old_ck)
    assert f"{tmp_path / 'last.pt'} was written by an older csgd (checkpoint format 1; this " in (
        str(e.value)
    )
    assert "format 3) and lacks optimizer" in str(e.value)
    torch.save({"arch": ck["arch"], "state_dict": ck["state_dict"]}, older)  # before formats
    assert "format" not in load_checkpoint(older)


# -- non-finite inputs --------------------------------------------------------------------
@pytest.mark.parametrize("sync_free", [False, True])
def test_nan_input_found_on_the_gpu_path_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_free: bool
) -> None:
    """On a GPU the check keeps no per-step host sync: the first bad step is noted on the
    device and read at the next guard (here the loss log every 3 steps); it names the
    same step and sample. Run on the CPU with the GPU path forced."""
    from omegaconf import OmegaConf

    from csgd_cli.runner.datasets import build_data

    cfg = OmegaConf.create({"name": "digits", "limit": 64, "batch_size": 16, "augment": False})
    data = build_data(cfg, seed=0, device=torch.device("cpu"))
    k = int(data.epoch_indices(0)[16 + 3])  # in the 2nd batch
    data.train_x = data.train_x.float()
    data.train_x[k] = float("inf")
    trainer = _trainer(tmp_path, monkeypatch, data, log_every=3)
    trainer.guard.sync_free = sync_free
    with pytest.raises(CsgdError, match=rf"at epoch 0 step 2 \(global step 2\).* samples \[{k}\]"):
        trainer.fit()
    stopped_at = trainer.step_in_epoch
    assert stopped_at == (3 if sync_free else 1), "GPU: at the next guard; CPU: at once"
