"""csgd check: chi per group and in total; exit 0 when ready to merge, 1 otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from ..errors import CsgdError, NotConverged
from ..groups import Clusters, channel_groups, check_clusters
from ..metrics import chi_terms
from .common import load, write_json

log = logging.getLogger("csgd")


def chi_report(model: nn.Module, clusters: Clusters, affine: bool = False) -> dict[str, Any]:
    """Total chi, chi relative to the kernels' squared norm, the largest deviation."""
    terms = chi_terms(model, channel_groups(model), clusters, affine)
    per = {
        k: {
            "chi": v["chi"].item(),
            "relative": (v["chi"] / v["norm"]).item(),
            "max_dev": v["max"].item(),
        }
        for k, v in terms.items()
    }
    total = sum(v["chi"].item() for v in terms.values())
    norm = sum(v["norm"].item() for v in terms.values())
    return {
        "chi": total,
        "relative": total / max(norm, 1e-30),
        "max_dev": max((v["max_dev"] for v in per.values()), default=0.0),
        "groups": per,
    }


def need_clusters(ck: dict[str, Any], path: str) -> Clusters:
    if ck.get("clusters"):
        return ck["clusters"]
    if ck.get("pruned_from") is not None:
        raise CsgdError(
            f"ckpt={path} is a pruned (already merged) model: it has no clusters to check",
            "pass the C-SGD checkpoint it came from (csgd.pt or last.pt of csgd train)",
        )
    raise CsgdError(
        f"ckpt={path} has no clusters (it was not C-SGD trained)",
        "run `csgd train init=<this file>` first",
    )


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if cfg.ckpt is None:
        raise CsgdError("csgd check needs a checkpoint", "pass ckpt=<csgd.pt or last.pt>")
    model, ck = load(cfg.ckpt, "ckpt")
    clusters = need_clusters(ck, cfg.ckpt)
    check_clusters(channel_groups(model), clusters)
    rep = chi_report(model, clusters)
    for name, g in rep["groups"].items():
        log.info(
            "%-28s chi %.3e  relative %.3e  max dev %.3e",
            name,
            g["chi"],
            g["relative"],
            g["max_dev"],
        )
    # Kernels alone are the paper's chi; a merge is exact only if gamma/beta match too.
    full = chi_report(model, clusters, affine=True)
    rep["affine_relative"], rep["affine_max_dev"] = full["relative"], full["max_dev"]
    rep["ready"] = max(rep["relative"], full["relative"]) <= cfg.check.tolerance
    rep["tolerance"] = cfg.check.tolerance
    write_json(out / "check.json", rep)
    msg = (
        f"chi {rep['chi']:.3e}, relative {rep['relative']:.3e}, largest deviation "
        f"{rep['max_dev']:.3e}; with norm gamma/beta: relative {full['relative']:.3e}"
    )
    worst = max(rep["relative"], full["relative"])
    if not rep["ready"]:
        raise NotConverged(
            f"not ready to merge: {msg} (above check.tolerance={cfg.check.tolerance:g}, "
            f"{worst / cfg.check.tolerance:.1f}x too large)",
            "train longer or with a larger epsilon; or merge anyway with csgd prune prune.force=true",
        )
    print(f"ready to merge: {msg}")
    return rep
