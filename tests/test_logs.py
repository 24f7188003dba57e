"""A phase's metric log (``csgd_cli.runner.logs.MetricLog``)."""

from __future__ import annotations

from pathlib import Path


def test_a_new_record_never_joins_a_line_cut_by_a_killed_writer(tmp_path: Path) -> None:
    from csgd_cli.common.files import read_jsonl
    from csgd_cli.runner.logs import MetricLog

    (tmp_path / "metrics.jsonl").write_text('{"phase": "train", "step": 1}\n{"phase": "tr')
    MetricLog(tmp_path, "train", tensorboard=False).write({"step": 2})
    skipped: list[str] = []
    recs = read_jsonl(tmp_path / "metrics.jsonl", skipped)
    assert [r["step"] for r in recs] == [1, 2]
    assert skipped == [f"{tmp_path / 'metrics.jsonl'} line 2 is not a JSON record: skipped"]
