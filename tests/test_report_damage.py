"""``csgd report`` survives any cut or damaged line in any file it reads (issue 22.6).

Two real small runs (a ``csgd pretrain`` and a ``csgd run``) are made once; then every
file the report reads (``.hydra/config.yaml``, every ``metrics.jsonl``, ``summary.json``,
``widths.json``, ``status.json``) is cut at every byte offset (a sample of them for a
long file, the last 40 always), and every line of it is replaced by lines of other
shapes; each time the report is made in-process (matplotlib replaced by a stub that
accepts every call, so the plotting code still reads every value). The report must
come back with a row per run, a damaged run marked as such."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from conftest import TINY_DIGITS

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import cli, report

SAMPLE = 40  # cut points per file beside the last 24 bytes (every one for a short file)
LINES = 24  # lines per file given other shapes (spread over the file)
READ = ("config.yaml", "metrics.jsonl", "summary.json", "widths.json", "status.json")
COMMON = [*TINY_DIGITS, "dataset.limit=64", "pretrain.epochs=1", "prune.export=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the report reads of two real runs (checkpoints left out)."""
    made, root = tmp_path_factory.mktemp("made"), tmp_path_factory.mktemp("runs")
    cli.main(["pretrain", *COMMON, f"hydra.run.dir={made / 'pretrain'}"])
    cli.main([
        "run", *COMMON, "schedule.epochs=1", "finetune.epochs=1", "ratio=0.5",
        "prune.force=true", f"hydra.run.dir={made / 'run'}",
    ])  # fmt: skip
    for p in made.rglob("*"):
        if p.is_file() and p.name in READ:
            dst = root / p.relative_to(made)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
    return root


def _plt() -> mock.MagicMock:
    """matplotlib.pyplot, as far as the report calls it, doing nothing."""
    plt = mock.MagicMock()
    plt.subplots.side_effect = lambda r, c, **kw: (mock.MagicMock(), [mock.MagicMock()] * c)
    return plt


def _write(path: str | Path, data: str | bytes) -> Path:
    """The report's files written plainly (no fsync: thousands of reports are made)."""
    p = Path(path)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _make(root: Path) -> dict[str, Any]:
    with (
        mock.patch.object(report, "pyplot", _plt),
        mock.patch.object(report, "atomic_write", _write),
    ):
        return report.write_report(root)


def _cuts(n: int) -> list[int]:
    step = max(1, n // SAMPLE)
    return sorted(set(range(0, n, step)) | set(range(max(0, n - 24), n)))


def _files(root: Path) -> list[Path]:
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name in READ)
    assert {p.name for p in found} >= {"config.yaml", "metrics.jsonl", "summary.json"}
    return found


def _check(rep: dict[str, Any], what: str) -> None:
    assert rep["runs"] == 1, what
    assert {r["status"] for r in rep["records"]} <= {"ok", "incomplete", "damaged", "failed"}
    assert "| run" in rep["table"], what


def _run_of(runs: Path, path: Path) -> Path:
    return runs / path.relative_to(runs).parts[0]  # the run a file belongs to


def test_the_intact_runs_report_ok(runs: Path) -> None:
    rep = _make(runs)
    assert rep["runs"] == 2
    assert [r["status"] for r in rep["records"]] == ["ok", "ok"], rep["records"]


def test_every_cut_of_every_file(runs: Path) -> None:
    checked = 0
    for path in _files(runs):
        blob = path.read_bytes()
        try:
            for n in _cuts(len(blob)):
                path.write_bytes(blob[:n])
                rep = _make(_run_of(runs, path))
                _check(rep, f"{path.name} cut to {n} of {len(blob)} bytes")
                if (
                    path.name in ("summary.json", "status.json")
                    and blob[:n].strip() != blob.strip()
                ):
                    rec = rep["records"][0]
                    assert rec["status"] == "damaged" and path.name in rec["message"], (n, rec)
                checked += 1
        finally:
            path.write_bytes(blob)
    assert checked > 300


BAD_JSON_VALUES = ('"x"', "5", "[1]", "null", '{"a": 1}', "-1", "1e999")
BAD_LINES = ("5", '"x"', "[1, 2]", "null", "{", "\x00\xff", '{"epoch": "x", "train_loss": []}',
             '{"phase": 3, "epoch": 1, "train_loss": 1.0, "test_acc": "x", "chi": "y"}')  # fmt: skip


def _variants(path: Path, text: str) -> list[str]:
    """``text`` with one line replaced: by lines of other shapes, and (a JSON or YAML
    ``key: value`` line) by the same key with values of other types."""
    lines = text.splitlines(keepends=True)
    out = []
    for i in sorted({round(j * (len(lines) - 1) / (LINES - 1)) for j in range(LINES)}):
        line = lines[i]
        subs = list(BAD_LINES) if path.suffix == ".jsonl" else ["::\n", "\x00\n"]
        m = re.match(r'^(\s*"?[\w.-]+"?\s*:\s*)(.*?)(,?)\s*$', line)
        if m and path.suffix != ".jsonl":
            subs += [f"{m[1]}{v}{m[3]}\n" for v in BAD_JSON_VALUES]
        out += [
            "".join([*lines[:i], s if s.endswith("\n") else s + "\n", *lines[i + 1 :]])
            for s in subs
        ]
    return out


def test_every_damaged_line_of_every_file(runs: Path) -> None:
    checked = 0
    for path in _files(runs):
        blob = path.read_bytes()
        try:
            for text in _variants(path, blob.decode()):
                path.write_bytes(text.encode(errors="surrogateescape"))
                _check(_make(_run_of(runs, path)), f"{path.name} damaged:\n{text}")
                checked += 1
        finally:
            path.write_bytes(blob)
    assert checked > 150


def test_a_pretrain_log_cut_by_20_bytes_reports_through_the_cli(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: ``csgd report`` on a pretrain whose metrics.jsonl lost its last
    20 bytes (once a TypeError from the table of no finished runs)."""
    run = tmp_path / "pretrain"
    shutil.copytree(runs / "pretrain", run)
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:-20])
    try:
        cli.main(["report", f"dir={run}"])
    except SystemExit as e:  # pragma: no cover - the failure this test is about
        raise AssertionError(capsys.readouterr().err) from e
    out = capsys.readouterr().out
    assert "1 run(s)" in out and "incomplete" in out
    assert (run / "report.md").is_file()


def test_no_runs_at_all_is_one_line() -> None:
    with pytest.raises(CsgdError, match="no runs found"):
        report.write_report(Path("/nonexistent-csgd-dir"))
