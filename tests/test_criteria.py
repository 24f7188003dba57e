"""The baselines' criteria (``csgd_cli/criteria.py``), the seed aggregation of ``csgd
report``, and a tiny compare run end to end.

Each criterion is checked on hand-made tensors of a network with one coupled group
(``a`` and ``b`` meet in a sum, BNs after both): which channels it keeps, and that the
members are scored jointly (the first producer alone would keep others)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from omegaconf import OmegaConf
from test_report import csgd, rows_of
from torch import nn

from csgd_cli.baselines.criteria import (
    CRITERIA,
    SparseGammaSGD,
    channel_scores,
    gamma_rows,
    select,
)
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.clustering import cluster_groups
from csgd_cli.core.optim import plain_sgd
from csgd_cli.core.surgery import merge
from csgd_cli.runner.report import write_report
from csgd_cli.tracing.trace import channel_groups


class Coupled(nn.Module):
    """Group ``a``: producers ``a`` and ``b`` (summed), BNs ``bn_a``, ``bn_b``; group
    ``c``: producer ``c`` with ``bn_c``, read by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.head(torch.relu(self.bn_c(self.c(y))).mean((2, 3)))


def coupled(a_rows: list[list[float]] | None = None, b_rows: list[list[float]] | None = None):
    torch.manual_seed(0)
    m = Coupled().eval()
    with torch.no_grad():
        for conv, rows in ((m.a, a_rows), (m.b, b_rows)):
            if rows is not None:
                conv.weight.copy_(torch.tensor(rows).reshape(4, 2, 1, 1))
    groups = channel_groups(m, torch.randn(2, 2, 4, 4))
    assert [(g.name, len(g.producers)) for g in groups] == [("a", 2), ("c", 1)]
    return m, groups


def kept(clusters: dict[str, list[list[int]]], name: str) -> list[int]:
    assert all(len(c) == 1 for c in clusters[name])  # singletons: the rest is dropped
    return [c[0] for c in clusters[name]]


def test_the_config_accepts_exactly_the_tables_names() -> None:
    from csgd_cli.runner.names import accepted

    assert accepted()["prune.method"] == ("csgd", *CRITERIA)


def test_l1_and_l2_norms_scored_jointly() -> None:
    # per channel: a's row, b's row; L1 and L2 disagree, and b changes a's ranking
    a = [[1, 1], [1.9, 0], [0.1, 0], [0.5, 0.5]]
    b = [[0, 0], [0, 0], [3, 0], [0, 0]]
    m, groups = coupled(a, b)
    # joint L1 [2, 1.9, 3.1, 1] keeps 0, 2 (a alone: 0, 1); joint squared L2
    # [2, 3.61, 9.01, 0.5] keeps 1, 2
    assert kept(select("l1", m, groups, {"a": 2}), "a") == [0, 2]
    assert kept(select("l2", m, groups, {"a": 2}), "a") == [1, 2]
    assert kept(select("l1", m, groups, {"a": 2, "c": 5}), "c") == [0, 1, 2, 3, 4]


def test_fpgm_drops_the_channel_nearest_the_others() -> None:
    # TP's FPGM measures distances between |w|^2 rows (points in 2-d here): a's points
    # (0,0) (1,.2) (1,0) (0,2) have distance sums 4.02, 3.28, 3.44, 6.30 (a alone drops
    # channel 1); b's (0,0) (5,0) (0,0) (0,0) add 5, 15, 5, 5: jointly channel 2 goes
    a = [[0, 0], [1, 0.2], [1, 0], [0, 2]]
    b = [[0, 0], [5, 0], [0, 0], [0, 0]]
    m, groups = coupled(
        [[math.sqrt(v) for v in r] for r in a], [[math.sqrt(v) for v in r] for r in b]
    )
    assert kept(select("fpgm", m, groups, {"a": 3}), "a") == [0, 1, 3]
    assert kept(select("l1", m, groups, {"a": 3}), "a") == [1, 2, 3]  # the norm drops 0
    with torch.no_grad():  # group c: points 0, 1, 2, 3, 10: the median (2) goes first
        m.c.weight.zero_()
        m.c.weight[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 10.0]).sqrt()
    assert kept(select("fpgm", m, groups, {"c": 4}), "c") == [0, 1, 3, 4]


def test_slimming_scores_every_bn_of_the_group() -> None:
    m, groups = coupled()
    with torch.no_grad():
        m.bn_a.weight.copy_(torch.tensor([1.0, 0.1, 0.5, 0.2]))
        m.bn_b.weight.copy_(torch.tensor([0.0, -1.0, 0.1, 0.1]))  # |gamma| counts
    # joint |gamma| [1, 1.1, 0.6, 0.3] keeps 0, 1 (bn_a alone: 0, 2)
    assert kept(select("slimming", m, groups, {"a": 2}), "a") == [0, 1]


def test_a_group_without_what_a_criterion_reads_is_refused_in_one_line() -> None:
    m, _ = coupled()
    m.bn_c = nn.Identity()  # group c: a conv and no BN
    groups = channel_groups(m, torch.randn(2, 2, 4, 4))
    with pytest.raises(CsgdError, match="group 'c' has no layer this criterion") as e:
        select("slimming", m, groups, {"a": 2, "c": 3})
    assert "\n" not in str(e.value)
    kept_all = select("slimming", m, groups, {"a": 2, "c": 5})  # c kept whole: no score needed
    assert kept(kept_all, "c") == [0, 1, 2, 3, 4]


def test_taylor_sums_over_batches_and_members() -> None:
    a = [[0, 0], [0, 0], [1, -1], [0.5, 2]]  # channel 1 lives in b only
    b = [[0, 0], [2, 1], [1, 1], [-1, 0.5]]
    m, groups = coupled(a, b)
    m.train()
    bn_before = m.bn_a.running_mean.clone()
    torch.manual_seed(1)
    batches = [(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    both = channel_scores("taylor", m, groups, ["a"], batches)["a"][0]
    one = [channel_scores("taylor", m, groups, ["a"], [bt])["a"][0] for bt in batches]
    assert torch.allclose(both, one[0] + one[1])  # accumulated over the batches
    # the oracle: sum over producers of |w * dL/dw| per channel, eval-mode forward
    expect = torch.zeros(4)
    for x, y in batches:
        m.eval()
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        for conv in (m.a, m.b):
            expect += (conv.weight * conv.weight.grad).abs().flatten(1).sum(1).detach()
    m.zero_grad(set_to_none=True)
    m.train()
    assert torch.allclose(both, expect, rtol=1e-5)
    assert both[0] == 0 and both[1] > 0  # zero kernels score 0; b alone carries channel 1
    assert kept(select("taylor", m, groups, {"a": 3}, batches=batches), "a") == [1, 2, 3]
    # scoring changes nothing: train mode back, no gradients left, BN statistics kept
    assert m.training and m.a.weight.grad is None
    assert torch.equal(m.bn_a.running_mean, bn_before)


def test_random_is_seeded_and_every_criterion_keeps_csgd_widths() -> None:
    from csgd_cli.models import get_model

    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10, in_channels=1, image_size=8).eval()
    groups = channel_groups(model)
    ks = {g.name: max(1, g.width // 2 - 1) for g in groups}
    r0, r1 = (select("random", model, groups, ks, seed=s) for s in (0, 1))
    assert r0 == select("random", model, groups, ks, seed=0) and r0 != r1
    x = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    thin_csgd = merge(model, groups, cluster_groups(model, groups, ks, "even"))
    for name in CRITERIA:
        sel = select(name, model, groups, ks, batches=[x])
        assert {g: len(c) for g, c in sel.items()} == ks
        assert merge(model, groups, sel, partial=True).widths == thin_csgd.widths


def test_sparse_gamma_sgd_penalises_only_the_pruned_groups() -> None:
    m, groups = coupled()
    hyper = {"lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    sched = OmegaConf.create({**hyper, "norm_weight_decay": None})
    rows = gamma_rows(m, groups, ["a"])
    assert {id(t) for t, _, _ in rows} == {id(m.bn_a.weight), id(m.bn_b.weight)}
    with torch.no_grad():
        m.bn_b.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    opt = SparseGammaSGD(plain_sgd(m, sched), rows, lam=0.5)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.bn_a.weight, before["bn_a.weight"] - 0.05)  # lr * lam * sign
    assert torch.allclose(m.bn_b.weight, torch.tensor([0.95, -0.95, 0.45, -0.45]))
    for k in ("bn_c.weight", "bn_a.bias", "a.weight"):  # nothing else moves
        assert torch.equal(dict(m.named_parameters())[k], before[k])
    assert set(opt.state_dict()) == {"state", "param_groups"}  # an SGD state: resumable


# -- csgd report: runs that differ only by seed ---------------------------------------------
def _run_dir(d: Path, method: str, seed: int, accs: tuple[float, float, float], **kw) -> None:
    """A finished ``csgd run`` as the report reads it: config, summary.json, status.json."""
    (d / ".hydra").mkdir(parents=True)
    target = kw.get("target", "flops:0.5")
    (d / ".hydra" / "config.yaml").write_text(
        f"stage: run\nseed: {seed}\nratio: 0.625\nratios: []\nepsilon: 0.05\n"
        f"model: {{name: resnet20}}\ndataset: {{name: digits}}\n"
        f"prune: {{method: {method}, target: '{target}'}}\n"
    )
    base, pruned, fine = accs
    row = {"params": 1000, "latency_ms": 1.0}
    rows = {
        "base": {**row, "acc": base, "macs": 4e6, "params": 2000, "latency_ms": 2.0},
        "pruned": {**row, "acc": pruned, "macs": 2e6},
        "finetuned": {**row, "acc": fine, "macs": 2e6},
    }
    (d / "summary.json").write_text(json.dumps({"ratio": 0.5, "rows": rows}))
    (d / "status.json").write_text(json.dumps({"status": kw.get("status", "ok")}))


def test_report_aggregates_seeds(tmp_path: Path) -> None:
    for seed, fine in enumerate((97.0, 98.0, 99.5)):
        _run_dir(tmp_path / f"c{seed}", "csgd", seed, (99.0, fine, fine))
        _run_dir(tmp_path / f"l{seed}", "l1", seed, (99.0, 50.0 + seed, 96.0))
    _run_dir(tmp_path / "l3", "l1", 3, (99.0, 10.0, 10.0), status="failed")  # not counted
    _run_dir(tmp_path / "t0", "csgd", 0, (99.0, 90.0, 91.0), target="flops:0.25")
    (tmp_path / "x" / ".hydra").mkdir(parents=True)
    (tmp_path / "x" / ".hydra" / "config.yaml").write_text("{unclosed: [")  # damaged
    rep = write_report(tmp_path)
    per_run = rows_of(tmp_path / "report.csv")
    assert len(per_run) == 9  # every run keeps its row
    assert {r["run"]: r["status"] for r in per_run}["x"] == "damaged"
    agg = {(r["method"], r["target"]): r for r in rows_of(tmp_path / "report_agg.csv")}
    assert set(agg) == {("csgd", "flops:0.5"), ("l1", "flops:0.5"), ("csgd", "flops:0.25")}
    c = agg["csgd", "flops:0.5"]
    assert c["n"] == "3" and c["seeds"] == "0 1 2"
    # by hand: mean 98.1667; deviations -1.1667, -0.1667, 1.3333; sum of squares 3.1667
    assert float(c["acc_finetuned_mean"]) == pytest.approx(98.1667, abs=1e-4)
    assert float(c["acc_finetuned_std"]) == pytest.approx(math.sqrt(3.1667 / 2), abs=1e-4)
    assert float(c["flops_reduction_mean"]) == pytest.approx(0.5)
    one = agg["l1", "flops:0.5"]
    assert one["n"] == "3" and float(one["acc_pruned_mean"]) == pytest.approx(51.0)
    assert float(one["acc_pruned_std"]) == pytest.approx(1.0)
    assert float(one["acc_finetuned_std"]) == 0.0
    t = agg["csgd", "flops:0.25"]
    assert t["n"] == "1" and t["acc_finetuned_std"] == ""  # no spread from one run
    md = (tmp_path / "report.md").read_text()
    assert "98.17 ± 1.26" in md and "96.00 ± 0.00" in md and "| csgd" in rep["agg_table"]
    assert rep["plots"] == ["acc_flops.png"]


# -- end to end: a tiny compare sweep, then csgd report -------------------------------------
def test_compare_sweep_end_to_end(tmp_path: Path) -> None:
    """csgd, taylor and slimming at one FLOPs target over 2 seeds: the same widths per
    seed, the same epoch budget, and a report with one aggregated row per method."""
    sweep = tmp_path / "sweep"
    r = csgd(
        "run",
        "-m",
        *TINY_DIGITS,
        "prune.method=csgd,taylor,slimming",
        "prune.target=flops:0.7",
        "seed=0,1",
        "pretrain.epochs=1",
        "schedule.epochs=1",
        "finetune.epochs=1",
        "prune.force=true",
        "prune.export=false",
        "prune.score_batches=2",
        "prune.slimming_lambda=1e-2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = csgd("report", f"dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean ± std over the runs that differ only by seed" in r.stdout
    per_run = rows_of(sweep / "report.csv")
    assert len(per_run) == 6 and {x["status"] for x in per_run} == {"ok"}
    assert {x["epochs"] for x in per_run} == {"3"}  # pretrain + C-SGD/sparsity/+ft + ft
    widths: dict[str, set[str]] = {}
    for x in per_run:
        s = json.loads((sweep / x["run"] / "summary.json").read_text())
        widths.setdefault(x["seed"], set()).add(json.dumps(s["widths"]["after"]))
        assert s["target"]["met"] and s["target"]["rows"]["flops"]["ratio"] <= 0.7
    assert all(len(w) == 1 for w in widths.values())  # every method: C-SGD's widths
    with open(sweep / "report_agg.csv", newline="") as f:
        agg = list(csv.DictReader(f))
    want = [("csgd", "2"), ("taylor", "2"), ("slimming", "2")]  # C-SGD first, config order
    assert [(a["method"], a["n"]) for a in agg] == want
    assert (sweep / "acc_flops.png").stat().st_size > 1000
    sparse = sweep / next(x["run"] for x in per_run if x["method"] == "slimming")
    assert (sparse / "sparsity" / "widths.json").is_file() and (sparse / "sparse.pt").is_file()
