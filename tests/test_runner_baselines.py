"""The baselines of ``csgd run`` and ``csgd prune`` (``csgd_cli.runner.baselines``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from csgd_cli.api.record import PruneRecord
from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import baselines
from csgd_cli.runner.baselines import baseline_widths, prune_step, score_batches, sparsity_phase
from csgd_cli.runner.session import Ctx, new_model, setup
from csgd_cli.runner.widthconf import pruner_for_config

# VGG-11 with 8 channels per conv on 8 x 8 synthetic images: 8 groups, each its own conv + BN
TINY = [
    "model=vgg16",
    "model.name=vgg11",
    "+model.kwargs.widths=[8,8,8,8,8,8,8,8]",
    "+model.kwargs.hidden=8",
    "dataset=synthetic",
    "dataset.num_train=64",
    "dataset.num_test=32",
    "dataset.image_size=8",
    "dataset.batch_size=16",
    "device=cpu",
    "ratio=0.5",
    "schedule.epochs=1",
    "schedule.log_every=0",
]
GROUPS = ["features.0", "features.4", "features.8", "features.11", "features.15",
          "features.18", "features.22", "features.25"]  # fmt: skip


def _cfg(*over: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.cli import config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("run", overrides=[*TINY, *over])


def _start(tmp_path: Path, *over: str) -> tuple[Ctx, nn.Module, torch.Tensor]:
    ctx = setup(_cfg(*over), tmp_path)
    return ctx, new_model(ctx.cfg, ctx.data.info), ctx.data.sample_batch(16)[0]


# -- widths ---------------------------------------------------------------------------------
def test_baseline_widths_are_those_csgd_would_choose(tmp_path: Path) -> None:
    ctx, model, _ = _start(tmp_path, "prune.method=l1")
    widths, record = baseline_widths(ctx.cfg, model, {}, None, None, None)
    assert widths == dict.fromkeys(GROUPS, 4)  # ratio 0.5 of 8 channels, every group
    csgd = pruner_for_config(ctx.cfg, model, {}, None, None, None)  # C-SGD's (k-means) pruner
    assert widths == csgd.widths
    assert record.group_widths == widths and record.base_widths == dict.fromkeys(GROUPS, 8)
    assert record.settings["ratio"] == 0.5 and record.settings["clustering"] == "kmeans"
    assert baseline_widths(ctx.cfg, model, {}, 0.25, None, None)[0] == dict.fromkeys(GROUPS, 2)


def test_baseline_widths_follow_the_clusters_a_checkpoint_carries(tmp_path: Path) -> None:
    ctx, model, _ = _start(tmp_path, "prune.method=l1")
    clusters = {g: [[c] for c in range(8)] for g in GROUPS}
    clusters["features.4"] = [[0, 1, 2], [3], [4, 5, 6, 7]]
    ck = PruneRecord(clusters=clusters).into({})
    widths = baseline_widths(ctx.cfg, model, ck, None, None, None)[0]
    assert widths == {**dict.fromkeys(GROUPS, 8), "features.4": 3}
    # a ratio given (an iterative round) makes new ones
    assert baseline_widths(ctx.cfg, model, ck, 0.5, None, None)[0] == dict.fromkeys(GROUPS, 4)


# -- score batches --------------------------------------------------------------------------
def test_score_batches_run_on_through_the_epochs() -> None:
    class Data:
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def train_batches(self, epoch: int) -> Iterator[tuple[int, int]]:
            self.epochs.append(epoch)
            yield from ((epoch, 0), (epoch, 1))  # two batches an epoch

    ctx = SimpleNamespace(data=Data(), cfg=OmegaConf.create({"prune": {"score_batches": 5}}))
    got = list(score_batches(ctx))
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert ctx.data.epochs == [0, 1, 2]  # epoch 3 is never started


# -- the prune step -------------------------------------------------------------------------
def test_l1_keeps_the_filters_of_largest_l1_norm(tmp_path: Path) -> None:
    ctx, model, x = _start(tmp_path, "prune.method=l1")
    w = model.features[0].weight.detach().clone()
    thin, rep = prune_step(ctx, model, {}, x, None, "base.pt")
    assert rep["method"] == "l1" and rep["group_widths"] == dict.fromkeys(GROUPS, 4)
    kept = thin.features[0].weight.detach()
    # by hand: the 4 of 8 filters whose absolute weights sum highest, in their order
    top = sorted(w.abs().sum((1, 2, 3)).topk(4).indices.tolist())
    assert torch.equal(kept, w[top])
    assert [m.out_channels for m in thin.modules() if isinstance(m, nn.Conv2d)] == [4] * 8


def test_widths_chosen_earlier_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, model, x = _start(tmp_path, "prune.method=l2")

    def not_again(*_: Any) -> None:
        raise AssertionError("the widths were given: none chosen again")

    monkeypatch.setattr(baselines, "baseline_widths", not_again)
    ks = {**dict.fromkeys(GROUPS, 8), "features.0": 2, "features.25": 5}
    thin, rep = prune_step(ctx, model, {}, x, None, "sparse.pt", widths=ks)
    convs = [m.out_channels for m in thin.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [2, 8, 8, 8, 8, 8, 8, 5] and rep["method"] == "l2"


@pytest.mark.parametrize(("method", "drawn"), [("taylor", 3), ("fpgm", 0)])
def test_only_a_gradient_criterion_draws_score_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, drawn: int
) -> None:
    ctx, model, x = _start(tmp_path, f"prune.method={method}", "prune.score_batches=3")
    seen = [0]
    batches = ctx.data.train_batches

    def counted(epoch: int) -> Iterator[Any]:
        for b in batches(epoch):
            seen[0] += 1
            yield b

    monkeypatch.setattr(ctx.data, "train_batches", counted)
    _, rep = prune_step(ctx, model, {}, x, None, "base.pt")
    assert seen[0] == drawn and rep["method"] == method
    assert rep["group_widths"] == dict.fromkeys(GROUPS, 4)


def test_csgd_needs_the_clusters_of_its_checkpoint(tmp_path: Path) -> None:
    ctx, model, x = _start(tmp_path)  # prune.method=csgd: merge, no criterion
    with pytest.raises(CsgdError, match=r"ckpt=base\.pt has no clusters"):
        prune_step(ctx, model, {}, x, None, "base.pt")


# -- Network Slimming's sparsity phase ------------------------------------------------------
def _gammas(model: nn.Module) -> list[float]:
    return [
        float(m.weight.detach().abs().sum())
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]


def test_sparsity_phase_shrinks_the_gammas_of_the_groups_to_cut(tmp_path: Path) -> None:
    """One epoch (4 steps) with and without the penalty, the last group excluded: its
    BN scales move as without the penalty; the others' drop (by hand: the penalty, 0.5
    a row, outweighs the loss's gradient on them by far)."""
    got = {}
    for lam in (0.0, 0.5):
        out = tmp_path / f"lam{lam}"
        ctx, model, _ = _start(out, "prune.method=slimming", f"prune.slimming_lambda={lam}",
                               "prune.exclude=[features.25]")  # fmt: skip
        model, ck = sparsity_phase(ctx, model, {}, "sparsity", out / "sparsity", 0.5, (1, 1))
        got[lam] = _gammas(model)
        widths = json.loads((out / "sparsity" / "widths.json").read_text())
        want = dict.fromkeys(GROUPS[:-1], 4)  # the excluded group is not cut
        assert widths["group_widths"] == want and widths["ratio"] == 0.5
        assert PruneRecord.from_checkpoint(ck).group_widths == want  # it travels with ck
        assert ck["phase"] == "sparsity" and ck["epoch"] == 1
        assert ck["hyper"]["schedule"]["slimming_lambda"] == lam  # a resume keeps it
    for plain, sparse in zip(got[0.0][:-1], got[0.5][:-1], strict=True):
        assert sparse < plain - 1.0
    assert got[0.5][-1] == pytest.approx(got[0.0][-1], abs=0.02)


def test_slimming_refuses_a_group_without_batchnorm(tmp_path: Path) -> None:
    ctx = setup(_cfg("prune.method=slimming"), tmp_path)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    model.arch = {"name": "custom", "kwargs": {}}  # what a checkpoint records
    with pytest.raises(CsgdError, match=r"prune\.method=slimming: group '0' has no BatchNorm"):
        sparsity_phase(ctx, model, {}, "sparsity", tmp_path / "sparsity", 0.5, (1, 1))
    assert not (tmp_path / "sparsity" / "last.pt").exists()  # refused before training


def test_schedules_of_a_gradient_criterion() -> None:
    """taylor adds C-SGD's epochs as l1 does (test_pipeline covers l1, slimming, csgd)."""
    cfg = _cfg("prune.method=taylor", "schedule.epochs=3", "finetune.epochs=2")
    assert baselines.retrain_schedule(cfg, 2) is None
    assert baselines.finetune_schedule(cfg, 2).epochs == 2 + 2 * 3
    again = _cfg("prune.method=taylor", "schedule.epochs=3", "prune.baseline_schedule=csgd")
    assert baselines.retrain_schedule(again, 2).epochs == 6
    assert baselines.finetune_schedule(again, 2) == again.finetune
