"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..common.files import table
from ..common.nets import count_macs, count_params
from ..common.target import Target
from ..deploy.latency import Runtime, ratios


@torch.no_grad()
def target_rows(
    target: str, base: nn.Module, thin: nn.Module, shape: Sequence[int], rt: Runtime
) -> dict[str, Any]:
    """``target`` (``flops:0.45``) against what ``thin`` reached: multiply-adds and
    parameters counted, latency timed in ``rt`` (base and thin alternating), each with
    its ratio to the base."""
    t = Target.parse(target)
    kind, value = t.kind, t.value
    (_, r), base_ms = ratios([base, thin], rt, shape)
    out = {
        "flops": {"base": count_macs(base, shape), "reached": count_macs(thin, shape)},
        "params": {"base": count_params(base), "reached": count_params(thin)},
        "latency": {
            "base": base_ms,
            "reached": base_ms * r,
            "backend": rt.backend,
            "batch": rt.batch,
            "threads": rt.nthreads,
        },
    }
    for v in out.values():
        v["ratio"] = v["reached"] / v["base"]
    met = out[kind]["ratio"] <= value
    res = [int(s) for s in shape[1:]]  # the per-image resolution counted and timed at
    return {
        "target": target,
        "kind": kind,
        "value": value,
        "met": met,
        "rows": out,
        "resolution": res,
    }


def summary_table(
    rows: dict[str, dict[str, Any]],
    widths: dict[str, dict[str, int]] | None = None,
    target: dict[str, Any] | None = None,
) -> str:
    """``csgd run``'s closing table: one row per model (base, csgd, pruned, ...); with
    ``widths`` (``before``/``after`` per group) each group whose width changed, and with
    ``target`` (``csgd run prune.target=...``) the target against what was reached."""
    base = rows["base"]["latency_ms"]
    cells = [
        [
            name,
            f"{r['acc']:.2f}",
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}",
            f"{r['latency_ms']:.2f}",
            _speedup(base, r),
        ]
        for name, r in rows.items()
    ]
    head = ["model", "top-1 %", "params", "MACs (M)", "latency ms", "speed-up"]
    out = table(head, cells, [False] + [True] * 5)
    if widths:
        out += "\n\n" + widths_table(widths["before"], widths["after"])
    if target:
        out += "\n\n" + target_table(target)
    return out


def _speedup(base_ms: float, row: dict[str, Any]) -> str:
    """The base's time over the row's, with the timer's spread (``deploy.timer``) when
    the row was timed beside the base: equal networks read 1.00x within it."""
    ratio = row["latency_ms"] / base_ms
    spread = row.get("latency_spread")
    return f"{1 / ratio:.2f}x" + (f" ±{spread / ratio**2:.2f}" if spread is not None else "")


def widths_table(before: dict[str, int], after: dict[str, int]) -> str:
    """Every group whose width changed: before, after, and the fraction kept."""
    cells = [
        [name, str(w), str(after[name]), f"{after[name] / w:.3f}"]
        for name, w in before.items()
        if name in after and after[name] != w
    ]
    kept = len(before) - len(cells)
    note = f"\n({kept} other groups keep their width)" if kept else ""
    return table(["group", "width before", "after", "kept"], cells, [False] + [True] * 3) + note


def target_table(target: dict[str, Any]) -> str:
    """The target against what was reached: MACs, parameters and latency (measured),
    each base, reached and their ratio; the target's own row says met or MISSED."""
    cells = []
    for kind, r in target["rows"].items():
        ms = kind == "latency"
        goal = ""
        if kind == target["kind"]:
            goal = f"<= {target['value']:g} ({'met' if target['met'] else 'MISSED'})"
        where = f" ({r['backend']}, batch {r['batch']})" if ms else ""
        base, got = (f"{v:.3f} ms" if ms else f"{v:,.0f}" for v in (r["base"], r["reached"]))
        cells.append([kind + where, base, got, f"{r['ratio']:.4f}", goal])
    res = target.get("resolution")
    at = f" at {res[0]}x{res[1]} per image" if res and len(res) == 2 else ""
    head = [f"target {target['target']}{at}", "base", "reached", "ratio", "target"]
    return table(head, cells, [False, True, True, True, False])
