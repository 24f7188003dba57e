"""The stages end to end through the real CLI: synthetic chain and the quickstart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORCE
from omegaconf import OmegaConf

from csgd_cli import load_model
from csgd_cli.api import checkpoint
from csgd_cli.api.checkpoint import load_checkpoint
from csgd_cli.api.record import PruneRecord
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.optim import plain_sgd
from csgd_cli.models import get_model
from csgd_cli.runner.datasets import build_data
from csgd_cli.runner.engine import Trainer
from csgd_cli.runner.evaluate import evaluate

TINY = [
    "dataset=synthetic",
    "dataset.num_train=128",
    "dataset.num_test=64",
    "dataset.batch_size=32",
    "model=resnet20",
    "eval.latency_iters=1",
    "eval.latency_batch=8",
]


def csgd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, CSGD_NO_BAR="1")
    out = subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=env
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_pretrain_lowers_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = OmegaConf.create(
        {
            "name": "synthetic",
            "num_train": 256,
            "num_test": 128,
            "batch_size": 32,
            "eval_batch_size": 128,
            "augment": False,
        }
    )
    data = build_data(cfg, seed=0, device=torch.device("cpu"))
    model = get_model("resnet20", widths=[8, 8, 8] + [8] * 9)
    sched = OmegaConf.create(
        {
            "epochs": 3,
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "norm_weight_decay": None,
            "kind": "cosine",
            "milestones": [],
            "gamma": 0.1,
            "warmup_epochs": 0,
            "eval_every": 1,
            "log_every": 0,
        }
    )
    before = evaluate(model, data, torch.device("cpu"))["loss"]
    trainer = Trainer(
        model,
        data,
        sched,
        plain_sgd(model, sched),
        device=torch.device("cpu"),
        out=tmp_path,
        phase="pretrain",
        payload={"arch": model.arch},
    )
    last = trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # training loss falls clearly below chance level (ln 10 = 2.30) and below epoch 1
    assert lines[-1]["train_loss"] < 0.85 * min(lines[0]["train_loss"], before)
    assert "test_loss" in last
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()


def test_stages_chain_from_the_cli(tmp_path: Path) -> None:
    d = {s: tmp_path / s for s in ("pre", "cl", "tr", "chk", "pr", "pr2", "ft", "ev")}
    csgd("pretrain", *TINY, "pretrain.epochs=1", f"hydra.run.dir={d['pre']}")
    base = d["pre"] / "last.pt"
    ck = torch.load(base, weights_only=True)
    assert {
        "arch",
        "state_dict",
        "epoch",
        "optimizer",
        "scheduler",
        "rng",
        "metrics",
        "config",
    } <= set(ck)
    assert "name: synthetic" in ck["config"]
    csgd("cluster", *TINY, f"ckpt={base}", "ratio=0.5", f"hydra.run.dir={d['cl']}")
    clustered = torch.load(d["cl"] / "clustered.pt", weights_only=True)
    assert len(PruneRecord.from_checkpoint(clustered).clusters["layer3"]) == 32
    csgd(
        "train",
        *TINY,
        f"init={d['cl'] / 'clustered.pt'}",
        "schedule.epochs=1",
        "schedule.log_every=2",
        FORCE,
        f"hydra.run.dir={d['tr']}",
    )
    trained = torch.load(d["tr"] / "last.pt", weights_only=True)
    clusters = PruneRecord.from_checkpoint(clustered).clusters
    assert PruneRecord.from_checkpoint(trained).clusters == clusters  # they come with init
    chi_logged = [json.loads(x) for x in (d["tr"] / "metrics.jsonl").read_text().splitlines()]
    assert all("chi" in r and "chi_groups" in r for r in chi_logged) and len(chi_logged) >= 3
    out = csgd("check", f"ckpt={d['tr'] / 'last.pt'}", f"hydra.run.dir={d['chk']}", check=False)
    assert out.returncode == 1 and "not ready to merge" in out.stderr
    assert json.loads((d["chk"] / "check.json").read_text())["chi"] > 0
    # unconverged: prune refuses and writes nothing, unless forced
    out = csgd(
        "prune", *TINY, f"ckpt={d['tr'] / 'last.pt'}", f"hydra.run.dir={d['pr']}", check=False
    )
    assert (
        out.returncode == 2 and "prune.force=true" in out.stderr and "Traceback" not in out.stderr
    )
    assert not (d["pr"] / "pruned.pt").exists()
    csgd(
        "prune",
        *TINY,
        f"ckpt={d['tr'] / 'last.pt'}",
        "prune.force=true",
        f"hydra.run.dir={d['pr2']}",
    )
    pruned = load_model(d["pr2"] / "pruned.pt")
    assert pruned.widths[:3] == [8, 16, 32]
    rep = json.loads((d["pr2"] / "prune.json").read_text())
    assert rep["params_after"] < rep["params_before"]
    # the reported agreement is what the two models do on the check batch
    synthetic = OmegaConf.create({"name": "synthetic", "num_train": 128, "num_test": 64})
    data = build_data(synthetic, seed=0, device=torch.device("cpu"))  # TINY's data set
    x, _ = data.sample_batch(rep["check_samples"])
    with torch.no_grad():
        a, b = load_model(d["tr"] / "last.pt")(x), pruned(x)
    assert rep["top1_agreement"] == (a.argmax(1) == b.argmax(1)).double().mean().item()
    assert rep["relative_logit_diff"] > 1e-4  # unconverged: forced through, and said so
    csgd(
        "finetune",
        *TINY,
        f"ckpt={d['pr2'] / 'pruned.pt'}",
        "finetune.epochs=1",
        f"hydra.run.dir={d['ft']}",
    )
    csgd("eval", *TINY, f"ckpt={d['ft'] / 'last.pt'}", f"hydra.run.dir={d['ev']}")
    ev = json.loads((d["ev"] / "eval.json").read_text())
    for key in (
        "acc",
        "loss",
        "params",
        "macs",
        "latency_ms",
        "throughput",
        "batch_size",
        "device",
    ):
        assert key in ev
    assert ev["params"] == sum(p.numel() for p in pruned.parameters())
    assert ev["batch_size"] == 8 and ev["macs"] > 0


def test_quickstart_merges_exactly(tmp_path: Path) -> None:
    """README's first command: the whole pipeline on digits; the merge changes nothing."""
    out = tmp_path / "qs"
    res = csgd("run", "experiment=quickstart", f"hydra.run.dir={out}")
    assert "finetuned" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert rows["pruned"]["acc"] == rows["csgd"]["acc"]
    assert rows["pruned"]["merge_check"]["relative_logit_diff"] < 1e-4
    assert rows["pruned"]["params"] < rows["base"]["params"] / 2
    # every test sample: same prediction, logits within 1e-4 relative
    cfg = OmegaConf.create(
        {"name": "digits", "batch_size": 64, "eval_batch_size": 512, "augment": False}
    )
    data = build_data(cfg, seed=0, device=torch.device("cpu"))
    csgd_model, thin = load_model(out / "csgd.pt"), load_model(out / "pruned.pt")
    with torch.no_grad():
        for x, _ in data.test_batches():
            a, b = csgd_model(x), thin(x)
            assert torch.equal(a.argmax(1), b.argmax(1))
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert thin.widths == [8, 16, 32] + [8] * 3 + [16] * 3 + [32] * 3
    for name in ("base.pt", "csgd.pt", "pruned.pt", "finetuned.pt"):
        torch.load(out / name, weights_only=True)
    # the exported program runs with csgd made unimportable
    code = (
        "import sys, torch; sys.modules['csgd_cli'] = None;"
        f"ep = torch.export.load({str(out / 'pruned.pt2')!r});"
        "print(tuple(ep.module()(torch.randn(5, 1, 8, 8)).shape))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip() == "(5, 10)", run.stderr


@pytest.mark.parametrize("method", ["kmeans", "even"])
def test_cluster_is_deterministic(tmp_path: Path, method: str) -> None:
    from csgd_cli.core.clustering import cluster_groups, target_widths

    model = get_model("resnet20")
    groups = model.channel_groups()
    a = cluster_groups(model, groups, target_widths(groups, 0.625), method, seed=3)
    b = cluster_groups(model, groups, target_widths(groups, 0.625), method, seed=3)
    assert (
        a == b
        and len(a["layer1"]) == 10
        and sorted(i for c in a["layer3"] for i in c) == list(range(64))
    )


def test_need_clusters_names_the_file(tiny_base: Path) -> None:
    from csgd_cli.runner.pipeline import prune_for_config

    cfg = OmegaConf.create({"prune": {"method": "csgd", "tolerance": 1e-4, "force": False}})
    path = tiny_base / "base/last.pt"
    model = checkpoint.model_from_checkpoint(load_checkpoint(path))
    with pytest.raises(CsgdError, match=f"ckpt={path} has no clusters"):
        prune_for_config(cfg, model, {}, torch.zeros(2, 1, 8, 8), str(path))


def test_l1_budget_rule() -> None:
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.cli import config_dir
    from csgd_cli.runner.pipeline import budget_schedule as l1_finetune

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("run", overrides=["experiment=compare_l1"])
        compose("report", overrides=["dir=somewhere"])
    assert l1_finetune(cfg, 1).epochs == cfg.finetune.epochs + cfg.schedule.epochs
    assert l1_finetune(cfg, 3).epochs == cfg.finetune.epochs + 3 * cfg.schedule.epochs
    assert l1_finetune(cfg, 1).lr == cfg.finetune.lr


@pytest.mark.parametrize("method", ["l1", "slimming", "csgd"])
def test_baseline_schedule_csgd_gives_criteria_csgds_learning_rates(method: str) -> None:
    """prune.baseline_schedule=csgd: a criterion retrains C-SGD's epochs on C-SGD's own
    schedule, then fine-tunes as C-SGD does; slimming (its sparsity phase is C-SGD's
    schedule already) and C-SGD are unchanged."""
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.baselines import finetune_schedule, retrain_schedule
    from csgd_cli.runner.cli import config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        over = [f"prune.method={method}", "schedule.lr=0.05", "finetune.lr=0.005"]
        cfg = compose("run", overrides=[*over, "prune.baseline_schedule=csgd"])
        plain = compose("run", overrides=over)
    again = retrain_schedule(cfg, 2)
    if method == "l1":
        assert again is not None
        assert (again.epochs, again.lr) == (2 * cfg.schedule.epochs, 0.05)
        assert again.milestones == cfg.schedule.milestones
    else:
        assert again is None
    assert finetune_schedule(cfg, 2) == cfg.finetune
    assert retrain_schedule(plain, 2) is None  # the default: C-SGD's epochs at finetune.lr
    extra = 2 * cfg.schedule.epochs if method == "l1" else 0
    assert finetune_schedule(plain, 2).epochs == cfg.finetune.epochs + extra
