"""Reading run directories for the report (``csgd_cli.runner.runs``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.runs import (
    Run,
    csgd_curve,
    find_runs,
    read_metrics,
    read_run,
    read_runs,
    sub,
)


def _run(d: Path, cfg: dict[str, Any] | None = None, **files: Any) -> Path:
    """A run directory: its config, and ``files`` (name -> JSON object, or text)."""
    (d / ".hydra").mkdir(parents=True)
    cfg = {"stage": "train", "seed": 0, "epsilon": 0.01, "ratio": 0.5, **(cfg or {})}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name, v in files.items():
        p = d / name.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(v if isinstance(v, str) else json.dumps(v))
    return d


def _lines(*recs: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def _ep(epoch: int, phase: str = "train", **kw: Any) -> dict[str, Any]:
    return {"phase": phase, "epoch": epoch, "train_loss": 1.0 / epoch, **kw}


# -- finding runs ---------------------------------------------------------------------------
def test_find_runs_in_sweep_order(tmp_path: Path) -> None:
    for name in ("10", "2", "0", "b", "a"):
        _run(tmp_path / name)
    _run(tmp_path / "0" / "inner")  # inside a run: not a run of its own
    _run(tmp_path / "rep", {"stage": "report"})  # a report is not a run
    _run(tmp_path / ".hidden" / "x")
    _run(tmp_path / "tb" / "x")  # TensorBoard's folder is never walked
    _run(tmp_path / "deep" / "1" / "3")
    _run(tmp_path / "deep" / "1" / "12")
    got = [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)]
    assert got == ["0", "2", "10", "a", "b", "deep/1/3", "deep/1/12"]


def test_a_run_dir_is_its_own_run(tmp_path: Path) -> None:
    _run(tmp_path)
    assert find_runs(tmp_path) == [tmp_path]
    assert [r.name for r in read_runs(tmp_path)] == ["."]


def test_read_runs_of_a_folder_without_runs(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(CsgdError) as e:
        read_runs(tmp_path)
    msg = str(e.value)
    assert f"dir={tmp_path}: no runs found" in msg and "pass the directory of a csgd run" in msg
    assert "\n" not in msg


def test_sub_of_a_damaged_config() -> None:
    assert sub({"prune": {"method": "l1"}}, "prune") == {"method": "l1"}
    assert sub({"prune": "l1"}, "prune") == {}
    assert sub({}, "prune") == {} and sub(["prune"], "prune") == {} and sub(None, "x") == {}


# -- metrics --------------------------------------------------------------------------------
def test_read_metrics_one_record_per_epoch_and_phase(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        _lines(
            {"phase": "train", "step": 3, "train_loss": 9.0},  # a step record: no epoch
            _ep(2, chi=0.5),
            _ep(1, chi=1.0),
            _ep(2, chi=0.25),  # logged again after a resume: the last wins
            {"epoch": 1, "train_loss": 2.0},  # no phase
            _ep(3, train_loss="nan"),  # another shape
            _ep(4) | {"epoch": 4.0},
        )
    )
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "metrics.jsonl").write_text(_lines(_ep(1, "finetune", test_acc=90)))
    notes: list[str] = []
    got = read_metrics(tmp_path, notes)
    assert sorted(got) == ["?", "finetune", "train"]
    assert [(r["epoch"], r["chi"]) for r in got["train"]] == [(1, 1.0), (2, 0.25)]
    assert got["finetune"][0]["test_acc"] == 90 and got["?"][0]["train_loss"] == 2.0
    shape = f"{tmp_path / 'metrics.jsonl'}: an epoch record of another shape is skipped"
    assert notes == [shape, shape]
    assert read_metrics(tmp_path / "nothing") == {}


def test_csgd_curve_lays_rounds_end_to_end() -> None:
    metrics = {
        "train_r10": [_ep(1, "train_r10", chi=0.1), _ep(2, "train_r10", chi=0.05)],
        "finetune": [_ep(1, "finetune", chi=9.0)],  # not C-SGD's
        "train": [_ep(1, chi=4.0), _ep(2, chi=2.0)],
        "train_r2": [_ep(1, "train_r2")],  # no chi logged
    }
    curve = csgd_curve(metrics)
    assert curve["epoch"] == [1, 2, 3, 4, 5]  # train, then round 2, then round 10
    assert curve["chi"][:2] == [4.0, 2.0] and math.isnan(curve["chi"][2])
    assert curve["chi"][3:] == [0.1, 0.05]
    assert curve["loss"] == [1.0, 0.5, 1.0, 1.0, 0.5]
    assert csgd_curve({}) == {"epoch": [], "chi": [], "loss": []}


# -- one run --------------------------------------------------------------------------------
def _rows(*names: str, acc: float = 50.0) -> dict[str, dict[str, Any]]:
    return {
        n: {"acc": acc + i, "params": 100 - i, "macs": 1000.0 - i, "latency_ms": 1.0}
        for i, n in enumerate(names)
    }


def test_a_csgd_run_with_rounds(tmp_path: Path) -> None:
    names = ("base", "csgd_r1", "pruned_r1", "csgd_r2", "pruned_r2", "finetuned")
    cfg = {"stage": "run", "ratio": 0.9, "ratios": [0.75, 0.5],
           "prune": {"method": "csgd", "target": None}}  # fmt: skip
    d = _run(tmp_path / "r", cfg, **{"summary.json": {"rows": _rows(*names)}})
    run = read_run(d, tmp_path)
    assert (run.name, run.status, run.message) == ("r", "ok", "")  # no status.json: rows
    assert run.method == "csgd" and run.ratio == 0.5 and run.epsilon == 0.01  # the last round's
    # each column from its last round
    assert run.acc == {"base": 50.0, "csgd": 53.0, "pruned": 54.0, "finetuned": 55.0}
    assert run.final == run.rows["finetuned"]


def test_a_baseline_run_and_its_final_row(tmp_path: Path) -> None:
    cfg = {"stage": "run", "ratios": [], "ratio": 0.7,
           "prune": {"method": "l1", "target": "flops:0.5"}}  # fmt: skip
    summary = {"ratio": 0.625, "rows": _rows("base", "pruned")}  # the share the target chose
    run = read_run(_run(tmp_path / "l", cfg, **{"summary.json": summary}), tmp_path)
    assert run.method == "l1" and run.target == "flops:0.5" and run.ratio == 0.625
    assert run.epsilon is None  # C-SGD's setting says nothing of a baseline
    assert run.final == run.rows["pruned"] and run.acc["csgd"] is None
    assert Run(tmp_path, "x", {}, rows=_rows("base", "csgd")).final is None


def test_widths_json_gives_the_ratio_of_the_clusters(tmp_path: Path) -> None:
    files = {"widths.json": {"ratio": 0.3}, "metrics.jsonl": _lines(_ep(1), _ep(2))}
    run = read_run(_run(tmp_path / "t", {"schedule": {"epochs": 2}}, **files), tmp_path)
    assert run.method == "csgd" and run.ratio == 0.3 and run.status == "ok"
    assert run.epochs == 2 and run.curve["epoch"] == [1, 2]
    bad = read_run(_run(tmp_path / "u", **{"widths.json": {"ratio": "x"}}), tmp_path)
    assert bad.ratio == 0.5  # not a number: the config's


@pytest.mark.parametrize(
    ("stage", "key", "want", "logged", "status"),
    [
        ("pretrain", "pretrain", 2, [1], "incomplete"),
        ("pretrain", "pretrain", 2, [1, 2], "ok"),
        ("finetune", "finetune", 0, [], "ok"),  # nothing to train: done
        ("finetune", "finetune", 3, [1, 2, 3], "ok"),
        ("train", "schedule", 2, [], "incomplete"),
        ("train", "schedule", "2", [1, 2], "incomplete"),  # a damaged epoch count
        ("cluster", "schedule", 0, [], "incomplete"),  # only status.json tells
        ("run", "schedule", 0, [], "incomplete"),  # no summary.json yet
    ],
)
def test_a_run_without_status_json_is_done_when_its_epochs_are(
    tmp_path: Path, stage: str, key: str, want: Any, logged: list[int], status: str
) -> None:
    recs = [_ep(e, stage, test_acc=80.0 + e) for e in logged]
    d = _run(tmp_path / "x", {"stage": stage, key: {"epochs": want}},
             **{"metrics.jsonl": _lines(*recs)})  # fmt: skip
    run = read_run(d, tmp_path)
    assert run.status == status and run.epochs == len(logged)
    col = {"pretrain": "base", "finetune": "finetuned", "train": "csgd"}.get(stage)
    if col and logged:
        assert run.acc[col] == 80.0 + logged[-1]


def test_the_method_of_each_stage(tmp_path: Path) -> None:
    got = {}
    for stage in ("train", "pretrain", "finetune", "prune", "check"):
        cfg = {"stage": stage, "prune": {"method": "taylor"}}
        got[stage] = read_run(_run(tmp_path / stage, cfg), tmp_path)
    assert {s: r.method for s, r in got.items()} == {
        "train": "csgd", "pretrain": "base", "finetune": "finetune", "prune": "taylor",
        "check": "taylor",
    }  # fmt: skip
    assert got["prune"].ratio == 0.5 and got["pretrain"].ratio is None  # no widths chosen


def test_status_json_and_error_txt(tmp_path: Path) -> None:
    failed = _run(tmp_path / "f", **{"status.json": {"status": "failed"},
                                     "error.txt": "Traceback\n  ...\nRuntimeError: boom\n\n"})  # fmt: skip
    ok = _run(tmp_path / "o", **{"status.json": {"status": "ok", "message": "fine"}})
    pre = _run(tmp_path / "p", **{"status.json": {"status": "preempted"}})
    said = _run(tmp_path / "s", **{"status.json": {"status": "failed", "message": "OOM"},
                                   "error.txt": "other\n"})  # fmt: skip
    runs = {r.name: r for r in read_runs(tmp_path)}
    assert (runs["f"].status, runs["f"].message) == ("failed", "RuntimeError: boom")
    assert (runs["o"].status, runs["o"].message) == ("ok", "fine")
    assert (runs["p"].status, runs["p"].message) == ("incomplete", "preempted")
    assert (runs["s"].status, runs["s"].message) == ("failed", "OOM")  # its own message wins
    assert [failed, ok, pre, said] == [r.path for r in runs.values()]


def test_a_value_of_another_type_marks_the_run_damaged(tmp_path: Path) -> None:
    # keys of two types cannot be sorted into the run's key: the run is damaged, not the report
    d = _run(tmp_path / "k", {1: "one"}, **{"metrics.jsonl": _lines(_ep(1))})
    run = read_run(d, tmp_path)
    assert run.status == "damaged" and run.rows == {} and run.curve == {}
    assert run.message.startswith("a file of this run holds a value of another type (TypeError")


def test_runs_that_differ_only_by_seed_share_a_key(tmp_path: Path) -> None:
    a = read_run(_run(tmp_path / "a", {"seed": 0}), tmp_path)
    b = read_run(_run(tmp_path / "b", {"seed": 1, "resume": True}), tmp_path)
    c = read_run(_run(tmp_path / "c", {"seed": 0, "epsilon": 0.02}), tmp_path)
    assert a.key == b.key != c.key
    assert "seed" not in json.loads(a.key) and json.loads(c.key)["epsilon"] == 0.02
