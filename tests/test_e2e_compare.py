"""End to end: a tiny compare sweep (C-SGD and two baselines over two seeds), then
``csgd report``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import TINY_DIGITS
from test_report import csgd, rows_of


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
        "prune.baseline_schedule=csgd",  # taylor: C-SGD's epoch on its lr, then the ft
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
    taylor = sweep / next(x["run"] for x in per_run if x["method"] == "taylor")
    assert (taylor / "retrained.pt").is_file() and (taylor / "finetune" / "last.pt").is_file()
    assert not (sparse / "retrained.pt").exists()
