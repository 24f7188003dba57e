"""csgd check: chi per group and in total; exit 0 when ready to merge, 1 otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...api.checkpoint import need_clusters
from ...api.pruner import CSGD
from ...common.errors import NotConverged
from ...common.files import write_json
from ..session import load

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    model, ck = load(cfg.ckpt, "ckpt")
    pruner = CSGD(model, clusters=need_clusters(ck, cfg.ckpt))  # checks them against the model
    rep = pruner.chi_report()
    for name, g in rep["groups"].items():
        log.info("%-28s chi %.3e  relative %.3e  max dev %.3e", name, *g.values())
    # Kernels alone are the paper's chi; a merge is exact only if gamma/beta match too.
    full = pruner.chi_report(affine=True)
    rep["affine_relative"], rep["affine_max_dev"] = full["relative"], full["max_dev"]
    worst = max(rep["relative"], full["relative"])
    rep["ready"], rep["tolerance"] = worst <= cfg.check.tolerance, cfg.check.tolerance
    write_json(out / "check.json", rep)
    msg = (
        f"chi {rep['chi']:.3e}, relative {rep['relative']:.3e}, largest deviation "
        f"{rep['max_dev']:.3e}; with norm gamma/beta: relative {full['relative']:.3e}"
    )
    if not rep["ready"]:
        raise NotConverged(
            f"not ready to merge: {msg} (above check.tolerance={cfg.check.tolerance:g}, "
            f"{worst / cfg.check.tolerance:.1f}x too large)",
            "train longer or with a larger epsilon; or merge anyway with csgd prune prune.force=true",
        )
    print(f"ready to merge: {msg}")
    return rep
