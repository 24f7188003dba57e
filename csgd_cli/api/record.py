"""What a checkpoint carries about channel groups: their clusters, widths and target, as
one typed record (``PruneRecord``) stored once, under ``KEY``. Files written before it
(checkpoint formats 1 and 2) kept these as loose top-level keys; ``from_checkpoint``
reads both layouts, and ``upgrade`` moves what older files kept here about a merged
network (the widths it was cut to) to where this csgd reads it, its ``arch``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..rules.groups import Clusters
from ..targets.plan import WidthPlan
from ..targets.problem import width_share

KEY = "prune"  # the checkpoint key that holds the record
# the top-level keys of formats 1 and 2, read by ``from_checkpoint`` and never written
OLD_KEYS = ("clusters", "base_widths", "group_widths", "width_settings", "ratio", "target")
OLD_KEYS += ("target_report", "target_base")
USER_ARCH = "user"  # ``arch`` name of a network of the user's own class (``csgd.save``)


@dataclass(frozen=True)
class PruneRecord:
    """``clusters``: each pruned group's clusters (None before clustering and after the
    merge). ``base_widths``: every group's original width (the first round's, kept
    across iterative rounds). ``group_widths``: each pruned group's width the clusters
    lead to (chosen before the merge; the widths a merged network was cut to are part
    of its architecture: ``arch["group_widths"]``, or a declared model's ``widths``).
    ``settings``: what chose the widths (the config's ``widthconf.WIDTH_KEYS``). ``target_report``: a target's, what the widths reach.
    ``target_base``: a target's base cost per kind (``{"flops": ...}``), kept across
    rounds so that every round aims at the base."""

    clusters: Clusters | None = None
    base_widths: dict[str, int] | None = None
    group_widths: dict[str, int] | None = None
    settings: dict[str, Any] | None = None
    target_report: dict[str, Any] | None = None
    target_base: dict[str, float] | None = None

    @property
    def target(self) -> str | None:
        """The target's spec (``"flops:0.5"``), or None for a ratio."""
        return None if self.target_report is None else self.target_report["target"]

    @property
    def ratio(self) -> float | None:
        """The ratio the widths were chosen at; with a target, the chosen widths' share
        of the original ones (what reports plot against)."""
        if self.target_report is not None and self.group_widths and self.base_widths:
            return width_share(self.base_widths, self.group_widths)
        return (self.settings or {}).get("ratio")

    @property
    def plan(self) -> WidthPlan:
        """The widths as the API's ``WidthPlan``."""
        widths, original = dict(self.group_widths or {}), dict(self.base_widths or {})
        return WidthPlan(widths, original, dict(self.settings or {}), self.target_report)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any]) -> PruneRecord:
        """The record of a checkpoint (or a payload) of either layout; empty when it
        has none."""
        if isinstance(ck.get(KEY), dict):
            return cls.from_dict(ck[KEY])
        settings = ck.get("width_settings") or ({"ratio": ck["ratio"]} if "ratio" in ck else None)
        return cls(
            clusters=ck.get("clusters") or None,
            base_widths=ck.get("base_widths") or None,
            group_widths=ck.get("group_widths") or None,
            settings=dict(settings) if settings is not None else None,
            target_report=ck.get("target_report"),
            target_base=ck.get("target_base"),
        )

    def into(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` carrying this record (under ``KEY``; no key of the old layout)."""
        out = {k: v for k, v in payload.items() if k not in OLD_KEYS}
        return {**out, KEY: self.to_dict()}

    def widths_json(self) -> dict[str, Any]:
        """What ``widths.json`` says (the report's ratio column reads it)."""
        out = {
            "ratio": self.ratio,
            "width_settings": self.settings,
            "group_widths": self.group_widths,
        }
        if self.target_report is not None:
            out.update(target=self.target, target_report=self.target_report)
            out["target_base"] = self.target_base
        return out

    replace = replace  # ``record.replace(clusters=...)``: a copy with fields changed


def user_arch(net: Any, group_widths: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``arch`` of a network of the user's own class: the class, and the widths a
    merge cut it to (what ``load_model(path, model=...)`` resizes a fresh one by)."""
    arch = {"name": USER_ARCH, "class": f"{type(net).__module__}.{type(net).__qualname__}"}
    return {**arch, "group_widths": dict(group_widths)} if group_widths else arch


def upgrade(ck: dict[str, Any]) -> dict[str, Any]:
    """``ck`` with a merged network's widths in its ``arch`` alone. ``csgd.save`` once
    wrote them into the record too (files of formats 1 to 3), the only place a network
    of the user's own class had them; the record's ``group_widths`` now say only what
    clusters lead to (the runner's records, which always carry ``base_widths``)."""
    rec, arch = PruneRecord.from_checkpoint(ck), ck.get("arch")
    if not rec.group_widths or rec.clusters or rec.base_widths or not isinstance(arch, dict):
        return ck
    if arch.get("name") == USER_ARCH:
        arch = {"group_widths": dict(rec.group_widths), **arch}
    return rec.replace(group_widths=None).into({**ck, "arch": arch})
