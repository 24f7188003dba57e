"""The checkpoint's record of groups, clusters, widths and target (``api.record``): typed,
stored once under one key, and read from files of the older layout (loose top-level
keys, checkpoint format 2) too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DIGITS
from torch import nn

from csgd_cli import CSGD, load_model, save
from csgd_cli.api.checkpoint import load_checkpoint, need_clusters
from csgd_cli.api.record import KEY, OLD_KEYS, USER_ARCH, PruneRecord, upgrade
from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import cli

REPORT = {"target": "flops:0.5", "kind": "flops", "base": 1000.0, "reached": 480.0}
RECORD = PruneRecord(
    clusters={"a": [[0, 1], [2], [3]]},
    base_widths={"a": 4, "b": 8},
    group_widths={"a": 3},
    settings={"ratio": None, "prune.target": "flops:0.5"},
    target_report=REPORT,
    target_base={"flops": 1000.0},
)


def old_layout(ck: dict[str, Any], fmt: int = 2) -> dict[str, Any]:
    """``ck`` as csgd wrote it before the record: every field a top-level key."""
    rec = PruneRecord.from_checkpoint(ck)
    out = {k: v for k, v in ck.items() if k != KEY}
    out.update(format=fmt, clusters=rec.clusters, base_widths=rec.base_widths,
               width_settings=rec.settings, ratio=rec.ratio, target_base=rec.target_base,
               group_widths=rec.group_widths)  # fmt: skip
    if rec.target_report is not None:
        out.update(target=rec.target, target_report=rec.target_report)
    return out


def test_the_record_round_trips_and_is_stored_once() -> None:
    ck = RECORD.into({"arch": {"name": "x"}, "clusters": None, "ratio": 0.5, "seed": 3})
    assert set(ck) == {"arch", "seed", KEY} and not set(ck) & set(OLD_KEYS)
    assert PruneRecord.from_checkpoint(ck) == RECORD
    assert PruneRecord.from_dict(RECORD.to_dict()) == RECORD
    assert RECORD.target == "flops:0.5" and RECORD.ratio == pytest.approx(3 / 4)
    plan = RECORD.plan
    assert plan.widths == {"a": 3} and plan.original == {"a": 4, "b": 8}
    assert plan.report == REPORT and plan.share == RECORD.ratio
    assert RECORD.replace(clusters=None).clusters is None and RECORD.clusters  # a copy


def test_the_old_layout_reads_as_the_same_record() -> None:
    assert PruneRecord.from_checkpoint(old_layout(RECORD.into({}))) == RECORD
    ratio_only = PruneRecord.from_checkpoint({"clusters": {"a": [[0], [1]]}, "ratio": 0.5})
    assert ratio_only.settings == {"ratio": 0.5} and ratio_only.ratio == 0.5
    assert ratio_only.target is None and ratio_only.base_widths is None
    assert PruneRecord.from_checkpoint({"arch": {}, "state_dict": {}}) == PruneRecord()


def test_widths_json_says_what_it_said_before() -> None:
    assert RECORD.widths_json() == {
        "ratio": pytest.approx(0.75), "width_settings": RECORD.settings,
        "group_widths": {"a": 3}, "target": "flops:0.5", "target_report": REPORT,
        "target_base": {"flops": 1000.0},
    }  # fmt: skip
    plain = PruneRecord(group_widths={"a": 2}, settings={"ratio": 0.5})
    want = {"ratio": 0.5, "width_settings": {"ratio": 0.5}, "group_widths": {"a": 2}}
    assert plain.widths_json() == want


def test_need_clusters_reads_either_layout() -> None:
    clusters = {"a": [[0, 1]]}
    assert need_clusters(PruneRecord(clusters=clusters).into({}), "x.pt") == clusters
    assert need_clusters({"clusters": clusters}, "x.pt") == clusters
    with pytest.raises(CsgdError, match="has no clusters"):
        need_clusters(PruneRecord().into({}), "x.pt")


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_a_merged_network_keeps_its_widths_in_its_arch_alone(tmp_path: Path) -> None:
    """``csgd.save`` of a merged network of the user's own class: the widths it was cut
    to ride in its ``arch`` (not in the record, not on the module), come back with it
    into a fresh instance, and stay when it is saved again."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    thin = CSGD(Net(8), x, ratio=0.5, clustering="even").merge(force=True).eval()
    widths = {"conv": 4, "head": 2}  # every group's, the output's (not pruned) too
    assert thin.arch == {"name": USER_ARCH, "class": f"{__name__}.Net", "group_widths": widths}
    assert not hasattr(thin, "group_widths")
    ck = load_checkpoint(save(thin, tmp_path / "thin.pt"), None)
    assert ck["arch"]["group_widths"] == widths and ck[KEY]["group_widths"] is None
    net = load_model(tmp_path / "thin.pt", model=Net(8))
    assert net.conv.out_channels == 4 and torch.allclose(net(x), thin(x))
    again = load_checkpoint(save(net, tmp_path / "again.pt"), None)
    assert again["arch"] == ck["arch"]


@pytest.mark.parametrize("fmt", [2, 3])
def test_an_older_file_with_the_widths_in_its_record_is_upgraded(tmp_path: Path, fmt: int) -> None:
    """Files ``csgd.save`` wrote before (formats 2 and 3) kept a merged network's widths
    in the record (the module's ``group_widths``): they load, the widths moved to arch."""
    thin = Net(4).eval()
    arch = {"name": USER_ARCH, "class": f"{__name__}.Net"}  # no widths: they were elsewhere
    new = PruneRecord(group_widths={"conv": 4}).into({"arch": arch, "format": 3})
    new["state_dict"] = thin.state_dict()
    torch.save(new if fmt == 3 else old_layout(new), tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt", None)
    assert ck["arch"] == {**arch, "group_widths": {"conv": 4}}
    assert PruneRecord.from_checkpoint(ck).group_widths is None and not set(ck) & set(OLD_KEYS)
    net = load_model(tmp_path / "old.pt", model=Net(8))
    x = torch.randn(1, 3, 6, 6)
    assert net.conv.out_channels == 4 and torch.allclose(net(x), thin(x))
    planned = RECORD.into({"arch": arch, "format": 3})  # the runner's: what clusters lead to
    assert upgrade(planned) is planned


def test_a_clustered_checkpoint_of_the_old_layout_still_trains_and_prunes(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format-2 file (clusters and widths as top-level keys) keeps its clusters, its
    settings refuse other widths, and the prune stage merges it."""
    base = tiny_base / "base/last.pt"
    cli.main(
        ["cluster", *TINY_DIGITS, f"ckpt={base}", "ratio=0.5", f"hydra.run.dir={tmp_path / 'cl'}"]
    )
    new = load_checkpoint(tmp_path / "cl/clustered.pt")
    rec = PruneRecord.from_checkpoint(new)
    assert rec.clusters and rec.group_widths is None and rec.settings["ratio"] == 0.5
    assert not set(new) & set(OLD_KEYS)
    old = tmp_path / "old.pt"
    torch.save(old_layout(new), old)
    assert PruneRecord.from_checkpoint(load_checkpoint(old)) == rec
    with pytest.raises(SystemExit) as e:  # its recorded settings still refuse other widths
        cli.main(["train", *TINY_DIGITS, f"init={old}", "ratio=0.25",
                  f"hydra.run.dir={tmp_path / 'bad'}"])  # fmt: skip
    assert e.value.code == 2 and "carries its own clusters (made with ratio=0.5" in (
        capsys.readouterr().err
    )
    pr = tmp_path / "pr"
    cli.main(["prune", *TINY_DIGITS, f"ckpt={old}", "prune.force=true", "prune.export=false",
              f"hydra.run.dir={pr}"])  # fmt: skip
    thin = load_model(pr / "pruned.pt")
    widths = dict(zip([g.name for g in thin.channel_groups()], thin.widths, strict=True))
    assert {g: widths[g] for g in rec.clusters} == {g: len(c) for g, c in rec.clusters.items()}
    pruned = PruneRecord.from_checkpoint(load_checkpoint(pr / "pruned.pt"))
    assert pruned.clusters is None and pruned.base_widths == rec.base_widths
