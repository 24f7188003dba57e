"""csgd report dir=<run or sweep dir>: report.md, report.csv and PNG plots, into ``dir``.

One table row per run (a ``csgd run``, a ``csgd train`` ... or each job of a ``-m``
sweep); the plots are chi and training loss per epoch (one line per epsilon) and
accuracy against FLOPs. See ``csgd_cli/report.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...common.errors import CsgdError
from ..report import write_report


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    del out  # everything goes into cfg.dir, next to the runs it describes
    if cfg.dir is None:
        raise CsgdError("csgd report needs a directory", "pass dir=<a run dir or a -m sweep dir>")
    root = Path(cfg.dir)
    if not root.is_dir():
        raise CsgdError(f"dir={root}: no such directory", "pass dir=<a run dir or a -m sweep dir>")
    rep = write_report(root)
    print(rep["table"])
    if any(a["n"] > 1 for a in rep["aggregate"]):  # seeds: the table that compares methods
        print(f"\nmean ± std over the runs that differ only by seed:\n{rep['agg_table']}")
    names = ["report.md", "report.csv", "report_agg.csv", *rep["plots"]]
    print(f"\n{rep['runs']} run(s); wrote {', '.join(names)} in {root}")
    return {k: v for k, v in rep.items() if k not in ("table", "agg_table")}
