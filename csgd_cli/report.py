"""Tables and plots over csgd runs: report.md, report.csv and PNG figures.

A *run* is any directory holding ``.hydra/config.yaml`` (Hydra writes one for every job);
a sweep directory holds one run per job (``0/``, ``1/``, ...). Per run this reads, when
present: ``status.json`` (sweeps), ``summary.json`` (``csgd run``) and every
``metrics.jsonl`` in the run dir or its phase subdirs. TensorBoard files are never read.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .errors import CsgdError
from .files import atomic_write, read_json, read_jsonl, table

ACC_KEYS = ("base", "csgd", "pruned", "finetuned")
# Which accuracy column a training phase fills when a run has no summary.json.
_PHASE_ACC = {"pretrain": "base", "train": "csgd", "finetune": "finetuned"}
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


@dataclass
class Run:
    """What the report knows about one run directory."""

    path: Path
    name: str
    cfg: dict[str, Any]
    status: str = "incomplete"
    message: str = ""
    method: str = ""
    ratio: float | None = None
    epsilon: float | None = None
    epochs: int = 0
    acc: dict[str, float | None] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # summary.json rows
    curve: dict[str, list[float]] = field(default_factory=dict)  # epoch, chi, loss

    @property
    def final(self) -> dict[str, Any] | None:
        """The last measured model (fine-tuned, else pruned) of a ``csgd run``."""
        keys = [k for k in self.rows if k != "base" and not k.startswith("csgd")]
        return self.rows[keys[-1]] if keys else None


# -- reading ---------------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """``root`` itself if it is a run, else every run below it, in sweep order."""
    found = []
    for cur, dirs, _ in os.walk(root):
        p = Path(cur)
        if (p / ".hydra" / "config.yaml").is_file():
            if _load_cfg(p).get("stage") != "report":
                found.append(p)
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "tb"]

    def key(p: Path) -> tuple:
        return tuple(
            (0, int(x), "") if x.isdigit() else (1, 0, x) for x in p.relative_to(root).parts
        )

    return sorted(found, key=key)


def _load_cfg(run: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)


def read_metrics(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Epoch records (those with ``train_loss``) per phase, one per epoch (the last
    logged wins, so a resumed phase that re-logged an epoch counts once)."""
    phases: dict[str, dict[int, dict[str, Any]]] = {}
    for path in [run / "metrics.jsonl", *sorted(run.glob("*/metrics.jsonl"))]:
        for rec in read_jsonl(path):
            if "train_loss" in rec and "epoch" in rec:
                phases.setdefault(rec.get("phase", "?"), {})[int(rec["epoch"])] = rec
    return {ph: [recs[e] for e in sorted(recs)] for ph, recs in phases.items()}


def _round(phase: str) -> int:
    """train -> 0, train_r2 -> 2: the order of C-SGD rounds."""
    tail = phase.rpartition("_r")[2]
    return int(tail) if "_r" in phase and tail.isdigit() else 0


def csgd_curve(metrics: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Chi and training loss per epoch over the C-SGD phase(s), rounds laid end to end."""
    curve: dict[str, list[float]] = {"epoch": [], "chi": [], "loss": []}
    offset = 0
    for ph in sorted((p for p in metrics if p.startswith("train")), key=_round):
        for rec in metrics[ph]:
            curve["epoch"].append(offset + rec["epoch"])
            curve["chi"].append(rec.get("chi", float("nan")))
            curve["loss"].append(rec["train_loss"])
        offset += metrics[ph][-1]["epoch"] if metrics[ph] else 0
    return curve


def _complete(run: Run, metrics: dict[str, list[dict[str, Any]]]) -> bool:
    """No status.json (a single, non-sweep run): did it get to its end?"""
    stage = run.cfg.get("stage")
    if stage == "run":
        return bool(run.rows)
    key = {"train": "schedule", "pretrain": "pretrain", "finetune": "finetune"}.get(stage or "")
    if key is None:
        return False
    want = int(run.cfg.get(key, {}).get("epochs", 0))
    recs = metrics.get(stage, [])
    return want == 0 or bool(recs and recs[-1]["epoch"] >= want)


def read_run(path: Path, root: Path) -> Run:
    cfg = _load_cfg(path)
    name = path.relative_to(root).as_posix()
    run = Run(path, name, cfg)
    stage = cfg.get("stage")
    run.method = {"train": "csgd", "pretrain": "base", "finetune": "finetune"}.get(
        stage, cfg.get("prune", {}).get("method", "csgd")
    )
    if stage in ("run", "train", "cluster", "check", "prune"):
        run.ratio = (cfg.get("ratios") or [cfg.get("ratio")])[-1]
    if run.method == "csgd" and stage in ("run", "train"):
        run.epsilon = cfg.get("epsilon")
    metrics = read_metrics(path)
    run.epochs = sum(len(v) for v in metrics.values())
    run.acc = dict.fromkeys(ACC_KEYS)
    for ph, recs in metrics.items():
        col = _PHASE_ACC.get(ph.partition("_r")[0])
        accs = [r["test_acc"] for r in recs if "test_acc" in r]
        if col and accs:
            run.acc[col] = accs[-1]
    summary = read_json(path / "summary.json")
    if summary:
        run.rows = summary.get("rows", {})
        for col in ACC_KEYS:
            keys = [k for k in run.rows if k == col or k.startswith(f"{col}_r")]
            run.acc[col] = run.rows[keys[-1]]["acc"] if keys else None
    run.curve = csgd_curve(metrics)
    status = read_json(path / "status.json")
    if status:
        run.status, run.message = status.get("status", "incomplete"), status.get("message", "")
        if run.status not in ("ok", "failed"):  # e.g. preempted: resumable, not done
            run.message = f"{run.status}: {run.message}".rstrip(": ")
            run.status = "incomplete"
    else:
        run.status = "ok" if _complete(run, metrics) else "incomplete"
    if run.status == "failed" and not run.message and (path / "error.txt").is_file():
        run.message = (path / "error.txt").read_text().strip().splitlines()[-1]
    return run


def read_runs(root: Path) -> list[Run]:
    paths = find_runs(root)
    if not paths:
        raise CsgdError(
            f"dir={root}: no runs found (no .hydra/config.yaml in it or below it)",
            "pass the directory of a csgd run or of a -m sweep",
        )
    return [read_run(p, root) for p in paths]


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
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "message"])
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)


# -- plots -----------------------------------------------------------------------------


def pyplot():  # -> matplotlib.pyplot, imported lazily (an optional dependency)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CsgdError(
            "matplotlib is not installed, so no plots were made", "pip install matplotlib"
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
    fig.savefig(path, dpi=120)
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
    fig.savefig(path, dpi=120)
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
