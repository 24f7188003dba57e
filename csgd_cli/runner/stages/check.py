"""csgd check: chi per group and in total, its forecast, and whether the merge will
pass; exit 0 when ready to merge, 1 otherwise.

"Ready" has one definition, the API's: ``CSGD.ready`` runs the merge's own check (the
thin network against the trained one, ``prune.tolerance``) on an input of the model's
shape; a refusal names the group and what still differs (``core.diagnose``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...api.checkpoint import need_clusters
from ...api.pruner import CSGD
from ...common.errors import NotConverged
from ...common.files import write_json
from ...core.diagnose import cause, deviations
from ..forecasting import check_lines
from ..session import load

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    model, ck = load(cfg.ckpt, "ckpt")
    pruner = CSGD(model, clusters=need_clusters(ck, cfg.ckpt))  # checks them against the model
    rep = pruner.chi_report()
    for name, g in rep["groups"].items():
        log.info("%-28s chi %.3e  relative %.3e  max dev %.3e", name, *g.values())
    full = pruner.chi_report(affine=True)
    rep["affine_relative"], rep["affine_max_dev"] = full["relative"], full["max_dev"]
    rep["deviations"] = deviations(pruner.model, pruner.groups, pruner.clusters)
    forecast, numbers = check_lines(ck, rep["chi"])
    rep.update(numbers)
    tol = cfg.prune.tolerance
    rep["ready"], rep["tolerance"] = pruner.ready(tol), tol
    write_json(out / "check.json", rep)
    msg = (
        f"chi {rep['chi']:.3e}, relative {rep['relative']:.3e}, largest deviation "
        f"{rep['max_dev']:.3e}; with norm gamma/beta: relative {full['relative']:.3e}; "
        f"{forecast}"
    )
    if not rep["ready"]:
        why, fix = cause(pruner.model, pruner.groups, pruner.clusters)
        raise NotConverged(
            f"not ready to merge: the merge check would fail at prune.tolerance={tol:g}; "
            f"{why}; {msg}",
            f"{fix}; or merge anyway with csgd prune prune.force=true",
        )
    print(f"ready to merge: {msg}")
    return rep
