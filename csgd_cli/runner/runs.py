"""Reading csgd run directories: what the report knows about each run.

A *run* is any directory holding ``.hydra/config.yaml`` (Hydra writes one for every job);
a sweep directory holds one run per job (``0/``, ``1/``, ...). Per run this reads, when
present: ``status.json`` (sweeps), ``summary.json`` (``csgd run``), ``widths.json`` (what
the clusters of a ``csgd train`` are) and every ``metrics.jsonl`` in the run dir or its
phase subdirs. TensorBoard files are never read.

A damaged file never stops the report: a metrics line cut short by a killed writer is
skipped (a note names it), and a run whose config, ``status.json`` or ``summary.json``
cannot be read gets the status ``damaged`` with a message saying which file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..common.errors import CsgdError
from ..common.files import read_json, read_json_checked, read_jsonl

log = logging.getLogger("csgd")
ACC_KEYS = ("base", "csgd", "pruned", "finetuned")
# Which accuracy column a training phase fills when a run has no summary.json.
_PHASE_ACC = {"pretrain": "base", "train": "csgd", "finetune": "finetuned"}


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
    target: str | None = None  # prune.target (then ratio: the widths' share it chose)
    key: str = ""  # the config without the seed: runs that differ only by seed share it
    epsilon: float | None = None
    epochs: int = 0
    acc: dict[str, float | None] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # summary.json rows
    curve: dict[str, list[float]] = field(default_factory=dict)  # epoch, chi, loss
    notes: list[str] = field(default_factory=list)  # lines of metrics.jsonl skipped

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
            if _load_cfg(p)[0].get("stage") != "report":
                found.append(p)
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "tb"]

    def key(p: Path) -> tuple:
        return tuple(
            (0, int(x), "") if x.isdigit() else (1, 0, x) for x in p.relative_to(root).parts
        )

    return sorted(found, key=key)


_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when built with it


def _load_cfg(run: Path) -> tuple[dict[str, Any], str | None]:
    """The run's config, or ({}, what is wrong) when it cannot be read."""
    try:  # plain YAML (what Hydra writes; interpolations stay strings): 20x OmegaConf's pace
        cfg = yaml.load((run / ".hydra/config.yaml").read_bytes(), Loader=_YAML)
    except Exception as e:  # YAML, decoding and OS errors of a damaged file
        return {}, f".hydra/config.yaml is damaged ({type(e).__name__})"
    if not isinstance(cfg, dict):
        return {}, ".hydra/config.yaml is damaged (not a mapping)"
    return cfg, None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float | None:
    """``v`` when it is a number, else None (a damaged line may hold any type)."""
    return v if _number(v) else None


def sub(cfg: Any, key: str) -> dict[str, Any]:
    """The mapping ``cfg[key]``, or {} when a damaged config holds something else."""
    v = cfg.get(key) if isinstance(cfg, dict) else None
    return v if isinstance(v, dict) else {}


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def read_metrics(run: Path, notes: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Epoch records (those with ``train_loss``) per phase, one per epoch (the last
    logged wins, so a resumed phase that re-logged an epoch counts once). ``notes``
    gets a line for every line of a metrics.jsonl that was skipped."""
    phases: dict[str, dict[int, dict[str, Any]]] = {}
    for path in [run / "metrics.jsonl", *sorted(run.glob("*/metrics.jsonl"))]:
        for rec in read_jsonl(path, notes):
            if "train_loss" in rec and "epoch" in rec:
                if not (_number(rec["train_loss"]) and isinstance(rec["epoch"], int)):
                    if notes is not None:
                        notes.append(f"{path}: an epoch record of another shape is skipped")
                    continue
                phases.setdefault(str(rec.get("phase", "?")), {})[rec["epoch"]] = rec
    return {ph: [recs[e] for e in sorted(recs)] for ph, recs in phases.items()}


_ROW_KEYS = ("acc", "params", "macs", "latency_ms")
# what may differ between runs aggregated as one (the seed; a base model made per seed)
_SEED_KEYS = ("seed", "init", "resume")  # what the report reads of a row


def _summary_rows(summary: Any) -> dict[str, dict[str, Any]] | None:
    """``summary.json``'s rows, or None when they are not what ``csgd run`` writes."""
    rows = summary.get("rows") if isinstance(summary, dict) else None
    if not isinstance(rows, dict) or not isinstance(rows.get("base"), dict):
        return None
    for row in rows.values():
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in _ROW_KEYS):
            return None
        if row["macs"] <= 0 or row["latency_ms"] <= 0:
            return None
    return rows


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
            chi = rec.get("chi")
            curve["chi"].append(chi if _number(chi) else float("nan"))
            curve["loss"].append(rec["train_loss"])
        offset += metrics[ph][-1]["epoch"] if metrics[ph] else 0
    return curve


def _complete(run: Run, metrics: dict[str, list[dict[str, Any]]]) -> bool:
    """No status.json (a single, non-sweep run): did it get to its end?"""
    stage = _str(run.cfg.get("stage"))
    if stage == "run":
        return bool(run.rows)
    key = {"train": "schedule", "pretrain": "pretrain", "finetune": "finetune"}.get(stage or "")
    if key is None:
        return False
    want = sub(run.cfg, key).get("epochs", 0)
    if not isinstance(want, int):
        return False
    recs = metrics.get(stage, [])
    return want == 0 or bool(recs and recs[-1]["epoch"] >= want)


def read_run(path: Path, root: Path) -> Run:
    cfg, damage = _load_cfg(path)
    name = path.relative_to(root).as_posix()
    run = Run(path, name, cfg)
    if damage:
        run.status, run.message = "damaged", damage
        return run
    try:
        return _read_run(run)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        # a value of a shape nothing above expected: the run is damaged, the report goes on
        run.status = "damaged"
        run.message = f"a file of this run holds a value of another type ({type(e).__name__}: {e})"
        run.rows, run.curve = {}, {}
        return run


def _read_run(run: Run) -> Run:
    path, cfg = run.path, run.cfg
    stage = _str(cfg.get("stage"))
    method = _str(sub(cfg, "prune").get("method", "csgd")) or "?"
    run.method = {"train": "csgd", "pretrain": "base", "finetune": "finetune"}.get(
        stage or "", method
    )
    if stage in ("run", "train", "cluster", "check", "prune"):
        ratios = cfg.get("ratios")
        run.ratio = _num(ratios[-1] if isinstance(ratios, list) and ratios else cfg.get("ratio"))
        run.target = _str(sub(cfg, "prune").get("target"))
    run.key = json.dumps(
        {k: v for k, v in cfg.items() if k not in _SEED_KEYS}, sort_keys=True, default=str
    )
    widths = read_json(path / "widths.json")  # clusters that came with init= win
    if isinstance(widths, dict) and _number(widths.get("ratio")):
        run.ratio = widths["ratio"]
    if run.method == "csgd" and stage in ("run", "train"):
        run.epsilon = _num(cfg.get("epsilon"))
    metrics = read_metrics(path, run.notes)
    for note in run.notes:
        log.warning("%s", note)
    run.epochs = sum(len(v) for v in metrics.values())
    run.acc = dict.fromkeys(ACC_KEYS)
    for ph, recs in metrics.items():
        col = _PHASE_ACC.get(ph.partition("_r")[0])
        accs = [r["test_acc"] for r in recs if _number(r.get("test_acc"))]
        if col and accs:
            run.acc[col] = accs[-1]
    summary, damage = read_json_checked(path / "summary.json")
    if summary is not None:
        rows = _summary_rows(summary)
        if rows is None:
            damage = "summary.json is damaged (its rows are not those csgd run writes)"
        else:
            run.rows = rows
            if _number(summary.get("ratio")):  # a target's: the share of widths it chose
                run.ratio = summary["ratio"]
            for col in ACC_KEYS:
                keys = [k for k in run.rows if k == col or k.startswith(f"{col}_r")]
                run.acc[col] = run.rows[keys[-1]]["acc"] if keys else None
    run.curve = csgd_curve(metrics)
    _read_status(run, metrics, damage)
    run.message = "; ".join(m for m in (run.message, *run.notes) if m)
    return run


def _read_status(run: Run, metrics: dict[str, list[dict[str, Any]]], damage: str | None) -> None:
    """The run's status and message: from status.json (damaged files said), else whether
    its phases are complete; a failure without a message takes error.txt's last line."""
    path = run.path
    status, bad_status = read_json_checked(path / "status.json")
    if damage or bad_status or (status is not None and not isinstance(status, dict)):
        run.status = "damaged"
        run.message = damage or bad_status or "status.json is damaged (not a JSON object)"
    elif status:
        run.status = str(status.get("status", "incomplete"))
        run.message = str(status.get("message", ""))
        if run.status not in ("ok", "failed"):  # e.g. preempted: resumable, not done
            run.message = f"{run.status}: {run.message}".rstrip(": ")
            run.status = "incomplete"
    else:
        run.status = "ok" if _complete(run, metrics) else "incomplete"
    if run.status == "failed" and not run.message and (path / "error.txt").is_file():
        lines = (path / "error.txt").read_text(errors="replace").strip().splitlines()
        run.message = lines[-1] if lines else ""


def read_runs(root: Path) -> list[Run]:
    paths = find_runs(root)
    if not paths:
        raise CsgdError(
            f"dir={root}: no runs found (no .hydra/config.yaml in it or below it)",
            "pass the directory of a csgd run or of a -m sweep",
        )
    return [read_run(p, root) for p in paths]
