"""``csgd run``'s closing tables and the target's rows (``csgd_cli.runner.tables``)."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.deploy.latency import Runtime
from csgd_cli.runner import tables
from csgd_cli.runner.tables import summary_table, target_rows, target_table, widths_table


def _row(acc: float, params: int, macs: float, ms: float, **kw: Any) -> dict[str, Any]:
    return {"acc": acc, "params": params, "macs": macs, "latency_ms": ms, **kw}


def _cells(text: str, line: int) -> list[str]:
    return [c.strip() for c in text.splitlines()[line].strip("|").split("|")]


def test_summary_table_one_row_per_model() -> None:
    rows = {
        "base": _row(91.234, 272474, 40.81e6, 2.0),
        "pruned": _row(90.0, 1234567, 10.2e6, 0.5),
        "finetuned": _row(92.5, 1000, 10.2e6, 1.0, latency_spread=0.1),
    }
    out = summary_table(rows)
    assert _cells(out, 0) == ["model", "top-1 %", "params", "MACs (M)", "latency ms", "speed-up"]
    assert _cells(out, 2) == ["base", "91.23", "272,474", "40.81", "2.00", "1.00x"]
    assert _cells(out, 3) == ["pruned", "90.00", "1,234,567", "10.20", "0.50", "4.00x"]
    # base / row = 2.00x; the spread of the ratio row/base (0.1) seen as a speed-up:
    # d(1/r) = dr / r**2 = 0.1 / 0.25
    assert _cells(out, 4)[-1] == "2.00x ±0.40"
    assert len(out.splitlines()) == 5  # no widths, no target: nothing more


def test_summary_table_adds_the_widths_and_the_target() -> None:
    rows = {"base": _row(90.0, 10, 1e6, 1.0)}
    widths = {"before": {"a": 8, "b": 4}, "after": {"a": 2, "b": 4}}
    target = _target("flops", 0.5, True, {"flops": (100.0, 40.0)})
    out = summary_table(rows, widths, target)
    parts = out.split("\n\n")
    assert len(parts) == 3
    assert parts[1] == widths_table(widths["before"], widths["after"])
    assert parts[2] == target_table(target)


def test_widths_table_lists_the_changed_groups() -> None:
    before = {"stem": 16, "layer1": 16, "layer2": 32, "gone": 8}
    after = {"stem": 16, "layer1": 4, "layer2": 24}
    out = widths_table(before, after)
    lines = out.splitlines()
    assert _cells(out, 0) == ["group", "width before", "after", "kept"]
    assert _cells(out, 2) == ["layer1", "16", "4", "0.250"]
    assert _cells(out, 3) == ["layer2", "32", "24", "0.750"]
    assert lines[-1] == "(2 other groups keep their width)"  # stem, and gone (not in after)
    assert len(lines) == 5


def test_widths_table_all_changed_has_no_note() -> None:
    out = widths_table({"a": 4}, {"a": 3})
    assert _cells(out, 2) == ["a", "4", "3", "0.750"] and "keep" not in out


def _target(
    kind: str, value: float, met: bool, pairs: dict[str, tuple[float, float]], res=(8, 8)
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for k, (base, got) in pairs.items():
        rows[k] = {"base": base, "reached": got, "ratio": got / base}
        if k == "latency":
            rows[k].update(backend="onnxruntime", batch=8, threads=1)
    spec = f"{kind}:{value:g}"
    return {"target": spec, "kind": kind, "value": value, "met": met, "rows": rows,
            "resolution": list(res)}  # fmt: skip


def test_target_table_says_met_or_missed_on_the_targets_row() -> None:
    pairs = {"flops": (4e7, 2.2e7), "params": (272474.0, 120000.0), "latency": (2.0, 1.5)}
    out = target_table(_target("latency", 0.7, False, pairs))
    assert _cells(out, 0) == ["target latency:0.7 at 8x8 per image", "base", "reached", "ratio",
                              "target"]  # fmt: skip
    assert _cells(out, 2) == ["flops", "40,000,000", "22,000,000", "0.5500", ""]
    assert _cells(out, 3) == ["params", "272,474", "120,000", "0.4404", ""]
    assert _cells(out, 4) == ["latency (onnxruntime, batch 8)", "2.000 ms", "1.500 ms", "0.7500",
                              "<= 0.7 (MISSED)"]  # fmt: skip
    met = target_table(_target("flops", 0.6, True, pairs, res=(224,)))
    assert _cells(met, 2)[-1] == "<= 0.6 (met)" and _cells(met, 4)[-1] == ""
    assert "per image" not in met  # a resolution that is not height x width is not said


def _net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, 10),
    )  # fmt: skip


def _macs(width: int, hw: int = 8) -> int:
    return width * 3 * 9 * hw * hw + width * 10


def _params(width: int) -> int:
    return width * 3 * 9 + width + width * 10 + 10


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """No timing: the base takes 2 ms and the thin network 0.6 of it (``ratios`` stubbed),
    the models' widths recorded."""
    seen: list[tuple[int, ...]] = []

    def fake(models: list[nn.Module], rt: Runtime, shape: Any) -> tuple[list[float], float]:
        seen.append(tuple(m[0].out_channels for m in models))
        return [1.0, 0.6], 2.0

    monkeypatch.setattr(tables, "ratios", fake)
    return seen


@pytest.mark.parametrize(
    ("spec", "met"),
    [("flops:0.5", True), ("flops:0.45", False), ("params:0.6", True), ("latency:0.55", False)],
)
def test_target_rows_counts_and_compares(timed: list, spec: str, met: bool) -> None:
    base, thin = _net(16), _net(8)
    rt = Runtime("eager", 4, 1)
    got = target_rows(spec, base, thin, (3, 8, 8), rt)
    kind, value = spec.split(":")
    assert (got["target"], got["kind"], got["value"]) == (spec, kind, float(value))
    assert got["resolution"] == [8, 8] and got["met"] is met
    rows = got["rows"]
    assert rows["flops"] == {"base": _macs(16), "reached": _macs(8),
                             "ratio": pytest.approx(_macs(8) / _macs(16))}  # fmt: skip
    assert rows["params"]["base"] == _params(16) and rows["params"]["reached"] == _params(8)
    assert rows["latency"] == {"base": 2.0, "reached": pytest.approx(1.2),
                               "ratio": pytest.approx(0.6), "backend": "eager", "batch": 4,
                               "threads": 1}  # fmt: skip
    assert timed == [(16, 8)]  # base first, then the thin network


def test_target_rows_refuses_a_bad_target(timed: list) -> None:
    with pytest.raises(CsgdError, match="unknown target kind 'macs'"):
        target_rows("macs:0.5", _net(4), _net(2), (3, 8, 8), Runtime())
    assert timed == []  # refused before anything is timed
