"""Tables and plots over csgd runs (read by ``runs.py``): report.md, report.csv (a row
per run), report_agg.csv (runs that differ only by seed: mean, std, n), PNGs."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..common.errors import CsgdError
from ..common.files import atomic_write, table
from .runs import ACC_KEYS, Run, read_runs, sub

COLUMNS = {  # csv key -> markdown header
    "run": "run",
    "model": "model",
    "dataset": "dataset",
    "method": "method",
    "ratio": "ratio",
    "target": "target",
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
        "model": sub(cfg, "model").get("name"),
        "dataset": sub(cfg, "dataset").get("name"),
        "method": run.method,
        "ratio": run.ratio,
        "target": run.target,
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
    extra = {"macs_base": base["macs"] if base else None, "key": run.key}  # not csv columns
    return {**rec, "message": run.message, **extra}


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
    right = [k not in ("run", "model", "dataset", "method", "target", "status") for k in COLUMNS]
    return table(list(COLUMNS.values()), cells, right)


def write_csv(records: list[dict[str, Any]], path: Path, fields: list[str] | None = None) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields or [*COLUMNS, "message"], extrasaction="ignore")
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
    atomic_write(path, buf.getvalue())  # a full disk keeps the previous report.csv


# -- runs that differ only by seed -------------------------------------------------------
SHOWN = ("model", "dataset", "method", "target", "epsilon")  # the same in every run of a row
STATS = ("ratio", "epochs", "acc_base", "acc_pruned", "acc_finetuned", "params", "macs",
         "flops_reduction", "speedup", "macs_base")  # fmt: skip
AGG_COLUMNS = {  # aggregate key -> markdown header
    "method": "method", "model": "model", "dataset": "dataset", "target": "target",
    "ratio": "ratio", "n": "n", "epochs": "epochs", "acc_base": "base %",
    "acc_pruned": "pruned %", "acc_finetuned": "fine-tuned %", "macs": "MACs (M)",
    "flops_reduction": "FLOPs", "speedup": "speed-up",
}  # fmt: skip


def _rank(method: str) -> tuple[int, str]:
    """C-SGD first, then the baselines in the config's order, then anything else."""
    from ..baselines.criteria import CRITERIA

    order = ("csgd", *CRITERIA)
    return (order.index(method) if method in order else len(order), method)


def _order(agg: dict[str, Any]) -> tuple:
    """Model, dataset, widest first, then the methods (``_rank``)."""
    return (str(agg["model"]), str(agg["dataset"]), -(agg["ratio_mean"] or 0), _rank(agg["method"]))


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per set of finished (``ok``) runs whose configs differ only by seed (the
    ``key`` of ``runs.Run``; without one, the shown columns and ratio): ``n``, the seeds,
    and per statistic its mean and sample standard deviation (None for one run)."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["status"] == "ok":
            key = r.get("key") or repr([r.get(k) for k in (*SHOWN, "ratio")])
            sets.setdefault(key, []).append(r)
    out = []
    for rows in sets.values():
        agg: dict[str, Any] = {k: rows[0].get(k) for k in SHOWN}
        agg.update(n=len(rows), seeds=" ".join(str(r.get("seed")) for r in rows))
        for k in STATS:
            vals = [float(r[k]) for r in rows if r.get(k) is not None]
            agg[f"{k}_mean"] = statistics.fmean(vals) if vals else None
            agg[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return sorted(out, key=_order)


def agg_table(aggs: list[dict[str, Any]]) -> str:
    """Mean ± std per cell (the std left out for one run); ``n`` runs per row."""

    def cell(a: dict[str, Any], k: str) -> str:
        if k not in STATS:
            return _fmt(k, a[k])
        mean, std = a[f"{k}_mean"], a[f"{k}_std"]
        if k == "ratio":
            return "-" if mean is None else f"{mean:.3g}"
        if k == "epochs":
            return _fmt(k, None if mean is None else round(mean))
        spread = k.startswith("acc_") and std is not None
        return _fmt(k, mean) + (f" ± {std:.2f}" if spread else "")

    cells = [[cell(a, k) for k in AGG_COLUMNS] for a in aggs]
    right = [k not in ("method", "model", "dataset", "target") for k in AGG_COLUMNS]
    return table(list(AGG_COLUMNS.values()), cells, right)


def agg_fields() -> list[str]:
    return [*SHOWN, "n", "seeds", *(f"{k}_{s}" for k in STATS for s in ("mean", "std"))]


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
    return _finish(plt, fig, path)


def _finish(plt: Any, fig: Any, path: Path) -> bool:
    """Lay out, write and close a figure (closed even when the write fails)."""
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return True


NAMES = {"csgd": "C-SGD", "l1": "L1", "l2": "L2", "fpgm": "FPGM", "taylor": "Taylor"}


def plot_acc_flops(aggs: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against MACs over the runs that differ only by seed (means, error bars
    of one std), one line per method: the final (fine-tuned) models on the left, the
    just-pruned ones on the right (a baseline's drop would squash the left's scale), the
    base models as stars; each width is labelled above with its target (else its ratio).
    Methods are offset slightly in x so that their bars stay apart."""
    aggs = [a for a in aggs if a["macs_mean"] and a["acc_finetuned_mean"] is not None]
    if not aggs:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = sorted({a["method"] for a in aggs}, key=_rank)
    bases = [a for a in aggs if a["macs_base_mean"]]
    label = lambda a: a["target"] or _fmt("ratio", a["ratio_mean"])  # noqa: E731
    widths = sorted({(round(a["macs_mean"] / 1e6, 4), label(a)) for a in aggs})
    for ax, k, title in ((axes[0], "finetuned", "final"), (axes[1], "pruned", "just pruned")):
        for b in {(a["model"], a["dataset"]): a for a in bases}.values():
            x, y, e = b["macs_base_mean"] / 1e6, b["acc_base_mean"], b["acc_base_std"] or 0
            ax.errorbar(x, y, yerr=e, fmt="*", ms=12, color="0.4", capsize=3, zorder=3)
        ax.plot([], [], "*", ms=12, color="0.4", label="base")
        for i, method in enumerate(methods):
            mine = sorted((a for a in aggs if a["method"] == method), key=lambda a: a["macs_mean"])
            shift = 1 + 0.012 * (i - (len(methods) - 1) / 2)
            x = [a["macs_mean"] / 1e6 * shift for a in mine]
            y = [a[f"acc_{k}_mean"] for a in mine]
            err = [a[f"acc_{k}_std"] or 0 for a in mine]
            name = NAMES.get(method, method.capitalize())
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=name)
        top = ax.twiny()  # each pruned width labelled with its target or ratio, above
        top.set_xlim(ax.get_xlim())
        top.set_xticks([w for w, _ in widths], [t for _, t in widths], fontsize=8)
        ax.set(xlabel="MACs per image (M)", ylabel="top-1 accuracy (%)", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = "/".join(map(str, sorted({a["n"] for a in aggs})))
    fig.suptitle(f"accuracy against FLOPs: mean ± std over {n} seed(s), one line per method")
    return _finish(plt, fig, path)


# -- the report ------------------------------------------------------------------------


def write_report(root: Path) -> dict[str, Any]:
    """report.md, report.csv and the PNGs in ``root``; returns what was written.

    The tables are written first, so a missing matplotlib still leaves them behind."""
    runs = read_runs(root)
    records = [record(r) for r in runs]
    table, aggs = markdown_table(records), aggregate(records)
    write_csv(records, root / "report.csv")
    write_csv(aggs, root / "report_agg.csv", agg_fields())
    md = [f"# csgd report: {root}", "", f"{len(runs)} run(s).", "", table, ""]
    if any(a["n"] > 1 for a in aggs):  # seeds to aggregate (report_agg.csv: always)
        md += ["## Runs that differ only by seed: mean ± std over n", "", agg_table(aggs), ""]
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
    for name, fn, arg, title in (
        ("chi_loss.png", plot_chi_loss, runs, "Chi and training loss per epoch"),
        ("acc_flops.png", plot_acc_flops, aggs, "Accuracy against FLOPs"),
    ):
        if fn(arg, root / name):
            plots.append(name)
            md += [f"## {title}", "", f"![{title}]({name})", ""]
    atomic_write(root / "report.md", "\n".join(md))
    out = {"dir": str(root), "runs": len(runs), "table": table, "records": records}
    return {**out, "aggregate": aggs, "agg_table": agg_table(aggs), "plots": plots}
