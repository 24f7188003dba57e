"""Iterative rounds (successive C-SGD + merge) and choosing which groups are pruned."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TINY_DIGITS
from omegaconf import OmegaConf
from test_pipeline import csgd

from csgd_cli import load_model
from csgd_cli.api.record import PruneRecord

DIGITS = [
    "dataset=digits",
    "dataset.limit=256",
    "model=resnet20",
    "pretrain.epochs=1",
    "schedule.epochs=1",
    "finetune.epochs=0",
    "eval.latency_iters=1",
    "eval.latency_batch=8",
    "prune.force=true",  # one epoch cannot converge; the merge check is tested elsewhere
]


def test_iterative_rounds_prune_towards_fractions_of_the_base(tmp_path: Path) -> None:
    out = tmp_path / "it"
    csgd("run", *DIGITS, "ratios=[0.75,0.5]", f"hydra.run.dir={out}")
    r1, r2 = load_model(out / "pruned_r1.pt"), load_model(out / "pruned_r2.pt")
    assert r1.widths[:3] == [12, 24, 48] and r2.widths[:3] == [8, 16, 32]
    assert r2.widths[3:] == [8] * 3 + [16] * 3 + [32] * 3
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rows"]) == [
        "base",
        "csgd_r1",
        "pruned_r1",
        "csgd_r2",
        "pruned_r2",
        "finetuned",
    ]
    ck = torch.load(out / "csgd_r2.pt", weights_only=True)
    rec = PruneRecord.from_checkpoint(ck)
    assert len(rec.clusters["layer1"]) == 8 and rec.base_widths["layer1"] == 16


def test_only_selected_groups_are_pruned(tmp_path: Path) -> None:
    out = tmp_path / "sel"
    csgd(
        "run",
        *DIGITS,
        "ratio=0.5",
        "prune.include=[layer3*]",
        "prune.exclude=[layer3.2.conv1]",
        f"hydra.run.dir={out}",
    )
    thin = load_model(out / "pruned.pt")
    names = [g.name for g in thin.channel_groups()]
    widths = dict(zip(names, thin.widths, strict=True))
    assert widths["layer1"] == 16 and widths["layer2"] == 32 and widths["layer3"] == 32
    assert widths["layer3.0.conv1"] == 32 and widths["layer3.2.conv1"] == 64


def test_default_norm_epsilon_reaches_an_exact_merge_in_every_iterative_round(
    tmp_path: Path,
) -> None:
    """Default norm_epsilon (0.1 eps), two C-SGD rounds, and no prune.force: each merge
    passes the 1e-4 logit check by itself."""
    out = tmp_path / "run"
    res = csgd(
        "run",
        *TINY_DIGITS,
        "pretrain.epochs=1",
        "schedule.epochs=14",
        "finetune.epochs=0",
        "epsilon=3",
        "schedule.lr=0.1",
        "schedule.weight_decay=0",
        "ratios=[0.75,0.5]",
        "prune.export=false",
        f"hydra.run.dir={out}",
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert cfg.norm_epsilon is None
    summary = json.loads((out / "summary.json").read_text())
    for tag in ("_r1", "_r2"):
        rep = summary["rows"][f"pruned{tag}"]["merge_check"]
        assert rep["relative_logit_diff"] < 1e-4 and rep["top1_agreement"] == 1.0, (tag, rep)
        assert summary["rows"][f"pruned{tag}"]["acc"] == summary["rows"][f"csgd{tag}"]["acc"]
