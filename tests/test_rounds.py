"""Unit tests of ``csgd_cli.runner.rounds`` (one round of ``csgd run``: train, prune, write)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DIGITS
from hydra import compose, initialize_config_dir

from csgd_cli.api.checkpoint import load_checkpoint
from csgd_cli.api.record import PruneRecord
from csgd_cli.common.config import register_schema
from csgd_cli.common.nets import count_params
from csgd_cli.runner.pipeline import payload
from csgd_cli.runner.rounds import prune_round
from csgd_cli.runner.session import Ctx, load, new_model, setup
from csgd_cli.tracing.trace import channel_groups

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_schema()
WIDTHS = [4, 8, 8, 4, 4, 4, 8, 8, 8, 8, 8, 8]  # TINY_DIGITS' resnet20, in its groups' order
GROUPS = ["layer1", "layer2", "layer3"] + [
    f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
]
FULL = dict(zip(GROUPS, WIDTHS, strict=True))
# One epoch of 4 steps. Plain SGD with lr x epsilon = 1: every step sets each member of a
# cluster to the cluster's centre, so the merge check passes without forcing it.
EXACT = [
    "dataset.limit=64",
    "schedule.epochs=1",
    "schedule.momentum=0",
    "schedule.nesterov=false",
    "schedule.weight_decay=0",
    "schedule.lr=0.1",
    "epsilon=10",
    "norm_epsilon=10",
    "schedule.log_every=0",
    "prune.export=false",
    "amp=false",
]


def context(out: Path, *overrides: str) -> Ctx:
    with initialize_config_dir(config_dir=CONF, version_base="1.3", job_name="run"):
        cfg = compose(config_name="run", overrides=[*TINY_DIGITS, *EXACT, *overrides])
    return setup(cfg, out)


def base_of(ctx: Ctx) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A base network and its checkpoint, as ``csgd run``'s base phase leaves them."""
    model = new_model(ctx.cfg, ctx.data.info)
    return model, {**payload(ctx.cfg, model, {}), "state_dict": model.state_dict()}


def start(tmp_path: Path, *overrides: str) -> tuple[Ctx, torch.nn.Module, dict, torch.Tensor]:
    """A context, its base network and checkpoint, and a batch to check merges on."""
    ctx = context(tmp_path, *overrides)
    model, ck = base_of(ctx)
    return ctx, model, ck, ctx.data.sample_batch(32)[0]


def widths(model: torch.nn.Module) -> dict[str, int]:
    return {g.name: g.width for g in channel_groups(model)}


def scaled(ratio: float) -> dict[str, int]:
    return {g: max(1, round(ratio * w)) for g, w in FULL.items()}


class Measure:
    """The ``measure`` of ``csgd run``: here the name and the widths of what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, int]]] = []

    def __call__(self, model: torch.nn.Module, name: str) -> dict[str, Any]:
        self.seen.append((name, widths(model)))
        return {"params": count_params(model)}


def test_a_csgd_round_trains_merges_and_reads_back_the_pruned_file(tmp_path: Path) -> None:
    ctx, model, ck, x = start(tmp_path, "ratio=0.5")
    rows, measure = {}, Measure()
    thin, pck = prune_round(ctx, model, ck, x, 0.5, (1, 1), measure, rows)
    half = scaled(0.5)
    assert [name for name, _ in measure.seen] == ["csgd", "pruned"]
    assert measure.seen[0][1] == FULL and measure.seen[1][1] == half
    assert list(rows) == ["csgd", "pruned"]  # one round: no tag
    assert rows["csgd"]["params"] == count_params(model)
    assert rows["csgd"]["chi_relative"] < 1e-10  # lr x epsilon = 1: clusters collapsed
    check = rows["pruned"]["merge_check"]
    assert check["passed"] and check["group_widths"] == half
    assert rows["pruned"]["params"] == check["params_after"] == count_params(thin)
    # the returned network is pruned.pt as written, and says where it came from
    assert widths(thin) == half and pck["pruned_from"] == str(tmp_path / "csgd.pt")
    on_disk = load_checkpoint(tmp_path / "pruned.pt", "run")
    assert all(torch.equal(v, on_disk["state_dict"][k]) for k, v in thin.state_dict().items())
    assert PruneRecord.from_checkpoint(load_checkpoint(tmp_path / "csgd.pt", "run")).clusters
    assert (tmp_path / "train" / "last.pt").is_file() and (
        tmp_path / "train" / "widths.json"
    ).is_file()
    assert not (tmp_path / "pruned.onnx").exists()  # prune.export=false
    trained, _ = load(str(tmp_path / "csgd.pt"), "run")
    with torch.no_grad():  # the merge kept the trained network's function
        a, b = trained.eval()(x), thin.eval()(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_rounds_are_tagged_and_each_prunes_towards_the_original_widths(tmp_path: Path) -> None:
    ctx, model, ck, x = start(tmp_path, "ratios=[0.5,0.25]")
    rows: dict[str, Any] = {}
    model, ck = prune_round(ctx, model, ck, x, 0.5, (1, 2), Measure(), rows)
    model, ck = prune_round(ctx, model, ck, x, 0.25, (2, 2), Measure(), rows)
    assert list(rows) == ["csgd_r1", "pruned_r1", "csgd_r2", "pruned_r2"]
    for name in ("csgd_r1.pt", "pruned_r1.pt", "csgd_r2.pt", "pruned_r2.pt", "train_r2"):
        assert (tmp_path / name).exists(), name
    assert widths(model) == scaled(0.25)  # a quarter of the base, not of round 1's half
    assert PruneRecord.from_checkpoint(ck).base_widths == FULL
    assert ck["pruned_from"] == str(tmp_path / "csgd_r2.pt")


@pytest.mark.parametrize("step", [(1, 1), (2, 2)])
def test_a_criterion_round_prunes_its_source_without_training(tmp_path: Path, step: tuple) -> None:
    """``prune.method=l1``: no training phase; round r prunes ``base.pt`` or the file of
    round r - 1, at the widths C-SGD would give."""
    ctx, model, ck, x = start(tmp_path, "prune.method=l1")
    rows, measure = {}, Measure()
    thin, pck = prune_round(ctx, model, ck, x, 0.5, step, measure, rows)
    tag = "_r2" if step == (2, 2) else ""
    assert list(rows) == [f"pruned{tag}"] and [n for n, _ in measure.seen] == [f"pruned{tag}"]
    src = "pruned_r1.pt" if tag else "base.pt"
    assert pck["pruned_from"] == str(tmp_path / src)
    assert widths(thin) == scaled(0.5) and rows[f"pruned{tag}"]["merge_check"]["method"] == "l1"
    assert not (tmp_path / "train").exists() and not (tmp_path / "csgd.pt").exists()
    assert (tmp_path / f"pruned{tag}.pt").is_file()


def test_a_slimming_round_trains_its_sparsity_phase_at_widths_chosen_first(tmp_path: Path) -> None:
    ctx, model, ck, x = start(tmp_path, "prune.method=slimming")
    rows, measure = {}, Measure()
    thin, pck = prune_round(ctx, model, ck, x, 0.5, (1, 1), measure, rows)
    assert [n for n, _ in measure.seen] == ["sparse", "pruned"] and list(rows) == [
        "sparse",
        "pruned",
    ]
    sparse = load_checkpoint(tmp_path / "sparse.pt", "run")
    assert PruneRecord.from_checkpoint(sparse).group_widths == scaled(0.5)
    assert widths(thin) == scaled(0.5) and pck["pruned_from"] == str(tmp_path / "sparse.pt")
    assert (tmp_path / "sparsity" / "last.pt").is_file()


def test_a_resumed_round_reuses_the_trained_file(tmp_path: Path) -> None:
    ctx, model, ck, x = start(tmp_path, "ratio=0.5")
    first, _ = prune_round(ctx, model, ck, x, 0.5, (1, 1), Measure(), {})
    shutil.rmtree(tmp_path / "train")  # a rerun that trained would write it again
    again = context(tmp_path, "ratio=0.5", "resume=true")
    model, ck = base_of(again)
    second, _ = prune_round(again, model, ck, x, 0.5, (1, 1), Measure(), {})
    assert not (tmp_path / "train").exists()
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
