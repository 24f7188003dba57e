"""Tables and plots over csgd runs (read by ``runs.py``): report.md, report.csv, PNGs."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .errors import CsgdError
from .files import atomic_write, table
from .runs import ACC_KEYS, Run, read_runs

COLUMNS = {  # csv key -> markdown header
    "run": "run",
    "model": "model",
    "dataset": "dataset",
    "method": "method",
    "ratio": "ratio",
    "epsilon": "epsilon",
    "seed": "seed",
    "epochs": "epochs",
    "acc_base": "base %",
    "acc_csgd": "C-SGD %",
    "acc_pruned": "pruned %",
    "acc_finetuned": "fine-tuned %",
    "params": "params",
    "macs": "MACs (M)",
    "flops_reduction": "FLOPs",
    "speedup": "speed-up",
    "status": "status",
}


# -- tables ----------------------------------------------------------------------------


def record(run: Run) -> dict[str, Any]:
    """One csv row: raw numbers, ``None`` where not measured."""
    cfg, fin, base = run.cfg, run.final, run.rows.get("base")
    rec: dict[str, Any] = {
        "run": run.name,
        "model": cfg.get("model", {}).get("name"),
        "dataset": cfg.get("dataset", {}).get("name"),
        "method": run.method,
        "ratio": run.ratio,
        "epsilon": run.epsilon,
        "seed": cfg.get("seed"),
        "epochs": run.epochs,
        **{f"acc_{k}": run.acc.get(k) for k in ACC_KEYS},
        "params": fin["params"] if fin else None,
        "macs": fin["macs"] if fin else None,
        "flops_reduction": 1 - fin["macs"] / base["macs"] if fin and base else None,
        "speedup": base["latency_ms"] / fin["latency_ms"] if fin and base else None,
        "status": run.status,
    }
    return {**rec, "message": run.message}


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key.startswith("acc_"):
        return f"{v:.2f}"
    return {
        "params": lambda: f"{v:,}",
        "macs": lambda: f"{v / 1e6:.2f}",
        "flops_reduction": lambda: f"-{100 * v:.2f}%",
        "speedup": lambda: f"{v:.2f}x",
        "ratio": lambda: f"{v:g}",
        "epsilon": lambda: f"{v:g}",
    }.get(key, lambda: str(v))()


def markdown_table(records: list[dict[str, Any]]) -> str:
    cells = [[_fmt(k, r[k]) for k in COLUMNS] for r in records]
    right = [k not in ("run", "model", "dataset", "method", "status") for k in COLUMNS]
    return table(list(COLUMNS.values()), cells, right)


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "message"])
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
    atomic_write(path, buf.getvalue())  # a full disk keeps the previous report.csv


def _save(fig: Any, path: Path) -> None:
    """A figure as PNG, written like every other file (atomically, one line when full)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, buf.getvalue())


# -- plots -----------------------------------------------------------------------------


def pyplot():  # -> matplotlib.pyplot, imported lazily (slow to import; a core dependency)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CsgdError(
            "matplotlib is not installed, so no plots were made",
            "pip install matplotlib (a dependency of csgd that is missing here)",
        ) from e
    return plt


def _labels(runs: list[Run]) -> list[str]:
    """'eps=0.01' plus whatever else differs between the runs (ratio, model, seed ...)."""
    recs = [record(r) for r in runs]
    extra = [k for k in ("model", "dataset", "ratio", "seed") if len({str(x[k]) for x in recs}) > 1]
    return [
        ", ".join(
            [f"eps={_fmt('epsilon', x['epsilon'])}"] + [f"{k}={_fmt(k, x[k])}" for k in extra]
        )
        for x in recs
    ]


def plot_chi_loss(runs: list[Run], path: Path) -> bool:
    """The appendix's Figure 1: chi (log scale) and training loss per C-SGD epoch."""
    runs = sorted((r for r in runs if r.curve.get("epoch")), key=lambda r: (r.epsilon or 0, r.name))
    if not runs:
        return False
    plt = pyplot()
    fig, (ax_chi, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, label in zip(runs, _labels(runs), strict=True):
        c = run.curve
        style = {"marker": "o", "markersize": 3} if len(c["epoch"]) <= 40 else {}
        ax_chi.plot(c["epoch"], c["chi"], label=label, **style)
        ax_loss.plot(c["epoch"], c["loss"], label=label, **style)
    ax_chi.set_yscale("log")
    ax_chi.set(
        xlabel="epoch", ylabel="chi (sum of squared kernel deviation)", title="kernel deviation chi"
    )
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for ax in (ax_chi, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("C-SGD training, one line per epsilon")
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return True


def plot_acc_flops(runs: list[Run], path: Path) -> bool:
    """Accuracy against MACs: each base model, and per method the just-pruned (hollow)
    and final (filled) models; each width is labelled with its ratio."""
    runs = [r for r in runs if r.final and r.status == "ok"]
    if not runs:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    base = [(r.rows["base"]["macs"] / 1e6, r.rows["base"]["acc"]) for r in runs]
    ax.scatter(*zip(*base, strict=True), marker="*", s=120, color="0.4", label="base", zorder=3)
    names = {"csgd": "C-SGD", "l1": "L1"}
    for i, method in enumerate(sorted({r.method for r in runs})):
        mine = sorted((r for r in runs if r.method == method), key=lambda r: r.final["macs"])
        color, name = f"C{i}", names.get(method, method)
        x = [r.final["macs"] / 1e6 for r in mine]
        pruned = [r.acc["pruned"] for r in mine]
        ax.plot(x, [r.final["acc"] for r in mine], "o-", color=color, label=f"{name}, final")
        ax.scatter(
            x, pruned, facecolors="none", edgecolors=color, s=60, label=f"{name}, just pruned"
        )
    widths = sorted({(r.final["macs"] / 1e6, r.ratio) for r in runs})
    top = ax.twiny()  # each pruned width labelled with its ratio, above the plot
    top.set_xlim(ax.get_xlim())
    top.set_xticks([w for w, _ in widths], [f"{r:g}" for _, r in widths], fontsize=8)
    top.set_xlabel("ratio", fontsize=8)
    ax.set(
        xlabel="MACs per image (M)",
        ylabel="top-1 accuracy (%)",
        title="accuracy against FLOPs",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return True


# -- the report ------------------------------------------------------------------------


def write_report(root: Path) -> dict[str, Any]:
    """report.md, report.csv and the PNGs in ``root``; returns what was written.

    The tables are written first, so a missing matplotlib still leaves them behind."""
    runs = read_runs(root)
    records = [record(r) for r in runs]
    table = markdown_table(records)
    write_csv(records, root / "report.csv")
    md = [f"# csgd report: {root}", "", f"{len(runs)} run(s).", "", table, ""]
    failed = [r for r in records if r["message"]]
    if failed:
        md += [
            "Messages:",
            "",
            *(f"- `{r['run']}` ({r['status']}): {r['message']}" for r in failed),
            "",
        ]
    atomic_write(root / "report.md", "\n".join(md))
    plots = []
    for name, fn, title in (
        ("chi_loss.png", plot_chi_loss, "Chi and training loss per epoch"),
        ("acc_flops.png", plot_acc_flops, "Accuracy against FLOPs"),
    ):
        if fn(runs, root / name):
            plots.append(name)
            md += [f"## {title}", "", f"![{title}]({name})", ""]
    atomic_write(root / "report.md", "\n".join(md))
    return {"dir": str(root), "runs": len(runs), "table": table, "records": records, "plots": plots}
