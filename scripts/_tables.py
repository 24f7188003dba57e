"""What the per-family table scripts (``timm_table.py``, ``transformer_table.py``) share:
weights made non-trivial, BN recalibration, reasons made countable, the choice of rows,
one process per row, the Markdown table and its summary line.

A row is a dict: ``model``, ``family``, ``size``, ``trace_s`` and ``time_s`` always; then
either ``refused`` (one line: refused before training, tracing stopped, or the row's process
failed) or ``rel``, ``top1`` and the script's figures.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]
_MARK = "ROW "  # a row process's last line: this, then the row as JSON


@torch.no_grad()
def nontrivial_(model: nn.Module, seed: int = 0) -> None:
    """BN statistics and affine terms away from (1, 0), zero or tiny gammas and layer
    scales (timm's zero-init residual branches, ConvNeXt's 1e-6) set to O(1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    for name, p in model.named_parameters():
        if p.dim() <= 1 and p.abs().max() < 1e-3:  # zero-init norm weights, layer scales
            weightish = name.endswith(("weight", "gamma", "gain")) or "scale" in name
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if weightish else p + 0.01)
        elif name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Re-estimate BN statistics as a plain average over a few batches (what a long run
    does anyway): channels made identical then see identical statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        if m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x[i::3])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def short_reason(why: str) -> str:
    """A reason with layer names and numbers replaced, so that reasons can be counted."""
    return re.sub(r"'[^']*'", "'...'", re.sub(r"\d+", "N", why))


def select(rows: Sequence[tuple], argv: list[str], quick: Sequence[str]) -> list[tuple]:
    """The rows named in ``argv``; else the ``quick`` ones under ``--quick``; else all."""
    names = [a for a in argv if not a.startswith("-")]
    if names:  # in the order named
        return [r for n in names for r in rows if r[0] == n]
    return [r for r in rows if "--quick" not in argv or r[0] in quick]


def refused_row(r: tuple, why: str, time_s: float = 0.0) -> Row:
    """The row of a model that stopped before any figure (``r``: name, family, size)."""
    return {"model": r[0], "family": r[1], "size": r[2], "trace_s": math.nan, "groups": 0,
            "refused": why, "time_s": time_s}  # fmt: skip


def run_here(rows: Sequence[tuple], row: Callable[..., Row], stop: type[Exception]) -> list[Row]:
    """Every row in this process; a ``stop`` (a one-line CsgdError) makes a refused row."""
    done = []
    for r in rows:
        t0 = time.perf_counter()
        try:
            done.append(row(*r))
        except stop as e:
            done.append(refused_row(r, str(e), time.perf_counter() - t0))
        print(f"{r[0]}: done", file=sys.stderr, flush=True)
    return done


def print_row(out: Row) -> None:
    """A row process's answer: its last stdout line."""
    print(_MARK + json.dumps(out), flush=True)


def run_isolated(script: str, rows: Sequence[tuple], timeout_s: float, jobs: int = 1) -> list[Row]:
    """Every row in a process of its own (``script --row NAME``, niced as this one), ``jobs``
    at a time: a crash, a traceback or a hang costs that row only. ``time_s`` is the
    process's wall time (imports included); ``load`` the 1-minute load average as it
    started. Rows come back in the order given."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda r: _one_process(script, r, timeout_s), rows))


def _one_process(script: str, r: tuple, timeout_s: float) -> Row:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cmd = [sys.executable, script, "--row", r[0]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        lines = [s for s in p.stdout.splitlines() if s.startswith(_MARK)]
        if lines:
            out = json.loads(lines[-1][len(_MARK) :])
        else:  # a traceback or a crash: its last line says what; the rest to stderr
            err = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
            print(f"{r[0]}:\n" + "\n".join(err[-40:]), file=sys.stderr)
            out = refused_row(r, f"process failed: {err[-1]}")
    except subprocess.TimeoutExpired:
        out = refused_row(r, f"process killed after {timeout_s:.0f} s")
    out["time_s"], out["load"] = time.perf_counter() - t0, load
    print(f"{r[0]}: {json.dumps(out)}", file=sys.stderr, flush=True)  # as it comes
    return out


def exact(r: Row, tol: float) -> bool:
    return "refused" not in r and r["rel"] <= tol and r["top1"] == 1.0


def markdown(rows: list[Row], head: list[Column], tail: list[Column], tol: float) -> str:
    """One line per row: the ``head`` cells, then the ``tail`` cells of a merged row, or
    the reason over those columns of a refused one; the time (and load) last."""
    cols = [*head, *tail, ("time", _time)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f(r) for _, f in head]
        if "refused" in r:
            cells += [f"refused: {r['refused']}"] + ["-"] * (len(tail) - 1)
        else:
            cells += [f(r) for _, f in tail]
        cells.append(_time(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_cell(tol: float) -> Column:
    """The merge check's column: relative logit difference, top-1, exact or not."""

    def cell(r: Row) -> str:
        ok = "exact" if exact(r, tol) else "NOT EXACT"
        return f"{r['rel']:.1e}, {100 * r['top1']:.0f}% ({ok})"

    return ("merge: rel. diff, top-1", cell)


def _time(r: Row) -> str:
    cpu = f", CPU {r['cpu_total_s']:.0f} s" if "cpu_total_s" in r else ""
    load = f" (load {r['load']:.1f}{cpu})" if "load" in r else ""
    return f"{r['time_s']:.0f} s{load}"


def summary(done: list[Row], tol: float) -> tuple[str, int]:
    """The line under the table and the exit status (0: every merged row exact)."""
    merged = [r for r in done if "refused" not in r]
    n_exact = sum(exact(r, tol) for r in merged)
    traced = [r["trace_s"] for r in done if not math.isnan(r["trace_s"])]
    slowest = f"{max(traced):.1f} s" if traced else "-"
    line = (
        f"{len(done)} models: {n_exact} merged exactly (rel. diff <= {tol:g}, top-1 100%), "
        f"{len(done) - len(merged)} refused, {len(merged) - n_exact} inexact; slowest "
        f"trace {slowest}"
    )
    return line, int(n_exact < len(merged))
