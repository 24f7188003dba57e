"""Sweeps and `csgd report` (``csgd_cli.runner.report``).

The sweeps run `python -m csgd_cli` in a subprocess with tiny settings on digits; the
epsilon sweep runs with TensorBoard made unimportable, so its runs have no TensorBoard
files at all."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from conftest import FORCE

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.report import write_report
from csgd_cli.runner.runs import read_runs

TINY = [
    "dataset=digits",
    "model=resnet20",
    "schedule.epochs=1",
    "pretrain.epochs=1",
    "finetune.epochs=0",
    "dataset.limit=256",
    "eval.latency_iters=1",
    "eval.latency_batch=8",
    "device=cpu",
    "prune.export=false",
    FORCE,  # one C-SGD epoch: the forecast would refuse it
]


def csgd(*args: str, cwd: Path, no_tensorboard: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
    if no_tensorboard is not None:  # a `tensorboard` package whose import fails
        stub = no_tensorboard / "tensorboard"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text("raise ImportError('tensorboard blocked by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(no_tensorboard), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def eps_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`csgd train -m epsilon=...`: three points, TensorBoard unimportable."""
    tmp = tmp_path_factory.mktemp("eps")
    sweep = tmp / "sweep"
    r = csgd(
        "train",
        "-m",
        "epsilon=1e-3,2e-3,1e-2",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp,
        no_tensorboard=tmp / "stub",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


@pytest.fixture(scope="module")
def run_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`csgd run -m prune.method=csgd,l1`, C-SGD not converged after 1 epoch (force)."""
    tmp = tmp_path_factory.mktemp("run")
    sweep = tmp / "sweep"
    r = csgd(
        "run",
        "-m",
        "prune.method=csgd,l1",
        "prune.force=true",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


def test_epsilon_sweep_report(eps_sweep: Path) -> None:
    jobs = sorted(p.name for p in eps_sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2"]
    for j in jobs:
        assert json.loads((eps_sweep / j / "status.json").read_text())["status"] == "ok"
        assert (eps_sweep / j / "metrics.jsonl").is_file()
        assert not (eps_sweep / j / "tb").exists()  # TensorBoard-free runs
    cwd = eps_sweep.parent / "cwd"
    cwd.mkdir()
    r = csgd("report", f"dir={eps_sweep}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert list(cwd.iterdir()) == []  # the report job leaves nothing of its own behind
    rows = rows_of(eps_sweep / "report.csv")
    assert len(rows) == 3
    assert sorted(float(x["epsilon"]) for x in rows) == [1e-3, 2e-3, 1e-2]
    assert {x["status"] for x in rows} == {"ok"}
    for x in rows:  # the C-SGD accuracy is the run's last evaluated test accuracy
        logged = [json.loads(ln) for ln in (eps_sweep / x["run"] / "metrics.jsonl").open()]
        last = [r["test_acc"] for r in logged if "test_acc" in r][-1]
        assert float(x["acc_csgd"]) == pytest.approx(last, abs=0.01)
    md = (eps_sweep / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per run
    assert table[0] in r.stdout
    png = eps_sweep / "chi_loss.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_point_is_marked_failed(tmp_path: Path) -> None:
    """A point that fails at run time (a damaged last.pt to resume from) is reported as
    failed; the other point of the sweep still completes."""
    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "last.pt").write_bytes(b"\x00garbage, not a checkpoint" * 10)
    r = csgd(
        "train",
        "-m",
        "resume=true",
        "epsilon=1e-2,2e-2",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 1  # the sweep reports its failed run ...
    assert (
        json.loads((sweep / "0" / "status.json").read_text())["status"] == "ok"
    )  # ... but ran the rest
    rep = write_report(sweep)
    by_run = {x["run"]: x for x in rep["records"]}
    assert by_run["0"]["status"] == "ok" and by_run["0"]["acc_csgd"] is not None
    assert by_run["1"]["status"] == "failed"
    assert "last.pt" in by_run["1"]["message"]
    assert "failed" in (sweep / "report.md").read_text()


def test_run_sweep_csgd_vs_l1(run_sweep: Path) -> None:
    rep = write_report(run_sweep)
    assert rep["plots"] == ["chi_loss.png", "acc_flops.png"]
    assert (run_sweep / "acc_flops.png").stat().st_size > 1000
    rec = {x["method"]: x for x in rep["records"]}
    assert set(rec) == {"csgd", "l1"}
    for x in rec.values():
        assert x["status"] == "ok"
        assert all(x[f"acc_{k}"] is not None for k in ("base", "pruned", "finetuned"))
        assert x["params"] > 0 and 0 < x["flops_reduction"] < 1 and x["speedup"] > 0
    assert rec["csgd"]["acc_csgd"] is not None and rec["l1"]["acc_csgd"] is None
    assert rec["l1"]["epsilon"] is None  # epsilon means nothing to L1
    # equal widths, and an equal epoch budget: L1 fine-tunes for the C-SGD epochs it skips
    summaries = {
        x["method"]: json.loads((run_sweep / x["run"] / "summary.json").read_text())
        for x in rep["records"]
    }
    widths = {m: s["rows"]["pruned"]["merge_check"]["widths"] for m, s in summaries.items()}
    assert widths["csgd"] == widths["l1"]
    assert rec["csgd"]["epochs"] == rec["l1"]["epochs"] == 2
    # a single run dir is a report of one row
    single = write_report(run_sweep / rec["l1"]["run"])
    assert [x["run"] for x in single["records"]] == ["."]


def _fake_run(d: Path, stage: str, epsilon: float, epochs: int) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"stage: {stage}\nepsilon: {epsilon}\nratio: 0.5\nratios: []\nseed: 0\n"
        f"model: {{name: resnet20}}\ndataset: {{name: digits}}\nschedule: {{epochs: {epochs}}}\n"
    )


def _epoch(epoch: int, chi: float) -> str:
    rec = {
        "phase": "train",
        "step": epoch * 4,
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "chi": chi,
        "test_acc": 50.0 + epoch,
    }
    return json.dumps(rec) + "\n"


def test_report_hand_made_runs(tmp_path: Path) -> None:
    """No TensorBoard, no status.json: an unfinished run (with an epoch logged twice, as
    after a resume) is incomplete, a preempted sweep point too, a finished one ok."""
    _fake_run(tmp_path / "a", "train", 0.01, 3)
    (tmp_path / "a" / "metrics.jsonl").write_text(
        _epoch(1, 10.0) + _epoch(2, 1.0) + _epoch(2, 0.9) + '{"phase": "tr'
    )
    _fake_run(tmp_path / "b", "train", 0.02, 2)
    (tmp_path / "b" / "metrics.jsonl").write_text(_epoch(1, 5.0) + _epoch(2, 0.1))
    _fake_run(tmp_path / "c", "train", 0.03, 2)
    (tmp_path / "c" / "status.json").write_text('{"status": "preempted", "message": "SIGTERM"}')
    runs = {r.name: r for r in read_runs(tmp_path)}
    assert runs["a"].status == "incomplete" and runs["a"].epochs == 2
    assert runs["a"].curve["chi"] == [10.0, 0.9] and runs["a"].acc["csgd"] == 52.0
    assert runs["b"].status == "ok"
    assert runs["c"].status == "incomplete" and "preempted" in runs["c"].message
    rep = write_report(tmp_path)
    assert rep["plots"] == ["chi_loss.png"]  # no FLOPs measured: no accuracy-FLOPs plot
    assert len(rows_of(tmp_path / "report.csv")) == 3


def test_report_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CsgdError, match="no runs found"):
        write_report(tmp_path)
    _fake_run(tmp_path / "0", "train", 0.01, 1)
    (tmp_path / "0" / "metrics.jsonl").write_text(_epoch(1, 1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(CsgdError, match="pip install matplotlib") as e:
        write_report(tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "report.csv").is_file()  # the tables are written all the same


def _bare_run(d: Path, stage: str = "train") -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"stage: {stage}\nepsilon: 0.01\nratio: 0.5\nratios: []\nseed: 0\n"
        "model: {name: resnet20}\ndataset: {name: digits}\nschedule: {epochs: 2}\n"
    )
    return d


def _epoch_line(epoch: int) -> str:
    rec = {"phase": "train", "step": 4 * epoch, "epoch": epoch, "train_loss": 1.0, "chi": 1.0}
    return json.dumps(rec) + "\n"


def test_report_skips_a_cut_line_and_marks_damaged_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from csgd_cli.runner.report import write_report

    cut = _bare_run(tmp_path / "cut") / "metrics.jsonl"
    cut.write_text(_epoch_line(1) + _epoch_line(2) + '{"phase": "train", "step": 9, "epo')
    _bare_run(tmp_path / "summary").joinpath("summary.json").write_text('{"rows": {"base": {"ac')
    _bare_run(tmp_path / "rows", "run").joinpath("summary.json").write_text('{"rows": [1, 2]}')
    _bare_run(tmp_path / "status").joinpath("status.json").write_text("[]")
    _bare_run(tmp_path / "config").joinpath(".hydra", "config.yaml").write_text("a: [1\n")
    with caplog.at_level("WARNING", logger="csgd"):
        rep = write_report(tmp_path)
    recs = {r["run"]: r for r in rep["records"]}
    note = f"{cut} line 3 is cut short (its writer was killed mid-line): skipped"
    assert recs["cut"]["status"] == "ok" and recs["cut"]["epochs"] == 2
    assert recs["cut"]["message"] == note and note in caplog.text
    assert {k: recs[k]["status"] for k in ("summary", "rows", "status", "config")} == dict.fromkeys(
        ("summary", "rows", "status", "config"), "damaged"
    )
    assert recs["summary"]["message"].startswith("summary.json is damaged (JSONDecodeError")
    assert "rows are not those csgd run writes" in recs["rows"]["message"]
    assert recs["status"]["message"] == "status.json is damaged (not a JSON object)"
    assert recs["config"]["message"].startswith(".hydra/config.yaml is damaged")
    md = (tmp_path / "report.md").read_text()
    assert note in md and re.search(r"\| damaged +\|", md)


def test_matplotlib_is_a_required_dependency() -> None:
    """`csgd report` plots after a plain `pip install .`."""
    core = [r for r in requires("csgd") or [] if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in core), core


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
