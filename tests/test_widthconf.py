"""Unit tests of ``csgd_cli.runner.widthconf`` (what a stage's config says about widths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from csgd_cli.api.pruner import CSGD
from csgd_cli.api.record import PruneRecord
from csgd_cli.common.config import register_schema
from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.deploy import latency
from csgd_cli.models import get_model
from csgd_cli.runner.data import DataInfo
from csgd_cli.runner.widthconf import (
    WIDTH_KEYS,
    pruner_for_config,
    width_record,
    width_settings,
    widths_reached,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_schema()
WIDTHS = [4, 8, 8, 4, 4, 4, 8, 8, 8, 8, 8, 8]  # TINY_DIGITS' resnet20: stages 4, 8, 8
# its channel groups, in the order of its ``widths``: a stage's residual sum, then each
# block's inner conv
GROUPS = ["layer1", "layer2", "layer3"] + [
    f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
]
FULL = dict(zip(GROUPS, WIDTHS, strict=True))
HALF = {g: w // 2 for g, w in FULL.items()}  # no ties: every width is even
INFO = DataInfo("digits", 10, 1, 8, 256, 360)


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3", job_name="run"):
        return compose(config_name="run", overrides=[*TINY_DIGITS, *overrides])


def net(widths: list[int] = WIDTHS) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("resnet20", widths=widths, num_classes=10, in_channels=1, image_size=8)


@pytest.fixture
def quick_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency timed briefly (a target's report times base and thin networks)."""
    monkeypatch.setattr(latency, "LAYER_S", 0.002)
    monkeypatch.setattr(latency, "NETWORK_S", 0.01)
    monkeypatch.setattr(latency, "ROUNDS", 3)
    monkeypatch.setattr(latency, "_MEMO", {})


# -- width_settings ------------------------------------------------------------------------
def test_width_settings_are_the_width_keys_as_plain_data() -> None:
    cfg = composed("ratio=0.75", "prune.exclude=[layer3]", "prune.round_to=2", "clustering=even")
    s = width_settings(cfg)
    assert tuple(s) == WIDTH_KEYS
    assert s == {
        "ratio": 0.75,
        "prune.target": None,
        "prune.min_width": None,
        "prune.rule": "distortion",
        "prune.round_to": 2,
        "prune.include": ["*"],
        "prune.exclude": ["layer3"],
        "clustering": "even",
    }
    assert type(s["prune.include"]) is list and type(s["prune.exclude"]) is list  # not OmegaConf
    assert width_settings(cfg, ratio=0.5)["ratio"] == 0.5  # an iterative round's own


def test_under_a_target_no_ratio_chose_the_widths() -> None:
    s = width_settings(composed("prune.target=flops:0.5"), ratio=0.5)
    assert s["ratio"] is None and s["prune.target"] == "flops:0.5"


# -- pruner_for_config: a ratio --------------------------------------------------------------
def test_a_fresh_pruner_takes_the_configs_ratio_groups_and_clustering() -> None:
    model = net()
    pruner = pruner_for_config(composed("ratio=0.5", "prune.exclude=[layer3]"), model, {})
    assert pruner.widths == {k: v for k, v in HALF.items() if k != "layer3"}
    assert pruner.plan.original == FULL
    even = pruner_for_config(composed("ratio=0.5", "clustering=even"), model, {})
    assert even.clusters["layer2"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # contiguous
    again = pruner_for_config(composed("ratio=0.5"), model, {}, clustering="even")
    assert again.clusters == even.clusters  # the argument overrides cfg.clustering


def test_kmeans_clusters_are_seeded_by_the_config() -> None:
    model = net()
    a = pruner_for_config(composed("ratio=0.5", "seed=3"), model, {}).clusters
    b = pruner_for_config(composed("ratio=0.5", "seed=3"), model, {}).clusters
    assert a == b
    assert {k: len(v) for k, v in a.items()} == HALF
    for name, clusters in a.items():  # each a partition of the group's channels
        assert sorted(i for c in clusters for i in c) == list(range(FULL[name]))


def test_round_to_makes_cluster_counts_multiples_of_it() -> None:
    model = net()
    pruner = pruner_for_config(composed("ratio=0.625", "prune.round_to=4"), model, {})
    assert set(pruner.widths.values()) == {4}  # 8 -> 5 -> 4 (ties down); 4 stays whole


def test_stored_clusters_are_reused_unless_a_ratio_or_round_is_forced() -> None:
    model = net()
    stored = CSGD(model, ratio=0.5, clustering="even").clusters
    base = {g: 2 * w for g, w in FULL.items()}  # an original twice as wide
    ck = PruneRecord(clusters=stored, base_widths=base).into({})
    cfg = composed("ratio=0.25")
    kept = pruner_for_config(cfg, model, ck)
    assert kept.clusters == stored and kept.widths == HALF
    assert kept.plan.original == base
    forced = pruner_for_config(cfg, model, ck, ratio=0.75)
    assert forced.clusters != stored
    assert forced.widths == FULL  # 0.75 of the original is 1.5x, capped at the width now
    rounds = pruner_for_config(cfg, model, ck, step=(2, 3))  # a round: cfg.ratio, anew
    assert rounds.widths == HALF and rounds.clusters != stored  # 0.25 of twice the width


# -- pruner_for_config: a target -------------------------------------------------------------
def test_a_target_round_aims_at_its_share_of_the_base_cost() -> None:
    model = net()
    cfg = composed("prune.target=params:0.5", "prune.rule=uniform")
    one = pruner_for_config(cfg, model, {}, step=(1, 1))
    rep = one.target_report
    assert rep["target"] == "params:0.5" and rep["base"] == count_params(model)
    assert rep["met"] and rep["reached"] <= 0.5 * count_params(model)
    first = pruner_for_config(cfg, model, {}, step=(1, 2)).target_report
    assert first["target"] == "params:0.707107"  # 0.5 ** (1/2): round 1 of 2
    assert first["reached"] > rep["reached"]


def test_a_later_round_counts_against_the_first_rounds_base() -> None:
    """The checkpoint's target base (the first round's model, here twice this one's
    cost) is what the target is a share of: half of it is all of this model."""
    model = net()
    ck = PruneRecord(target_base={"params": 2.0 * count_params(model)}).into({})
    cfg = composed("prune.target=params:0.5", "prune.rule=uniform")
    pruner = pruner_for_config(cfg, model, ck, step=(1, 1))
    assert pruner.target_report["base"] == 2.0 * count_params(model)
    assert pruner.widths == FULL  # nothing to cut


# -- width_record ----------------------------------------------------------------------------
def test_width_record_of_a_ratio() -> None:
    model = net()
    cfg = composed("ratio=0.5")
    pruner = pruner_for_config(cfg, model, {})
    rec = width_record(cfg, pruner, width_settings(cfg))
    assert rec == PruneRecord(
        base_widths=FULL,
        group_widths=HALF,
        settings=width_settings(cfg),
    )
    assert rec.ratio == 0.5


def test_width_record_of_a_target_keeps_its_base_cost() -> None:
    cfg = composed("prune.target=params:0.5", "prune.rule=uniform")
    pruner = pruner_for_config(cfg, net(), {}, step=(1, 1))
    rec = width_record(cfg, pruner, width_settings(cfg))
    assert rec.target_report == pruner.target_report and rec.target == "params:0.5"
    assert rec.target_base == {"params": pruner.target_report["base"]}
    assert rec.group_widths == pruner.widths and rec.clusters is None


# -- widths_reached --------------------------------------------------------------------------
THIN = [2, 4, 8, 2, 2, 2, 4, 4, 4, 4, 4, 4]  # every group halved but layer3 (8)


def test_widths_reached_lists_each_groups_width_before_and_after() -> None:
    base, thin = net(), net(THIN)
    out = widths_reached(composed(), base, thin, INFO)
    assert set(out) == {"widths"}  # no target: nothing else
    assert out["widths"] == {"before": FULL, "after": {**HALF, "layer3": 8}}


@pytest.mark.usefixtures("quick_timer")
def test_widths_reached_with_a_target_says_what_was_reached() -> None:
    base, thin = net(), net(THIN)
    out = widths_reached(composed("prune.target=params:0.5"), base, thin, INFO)
    t = out["target"]
    assert t["target"] == "params:0.5" and t["kind"] == "params" and t["resolution"] == [8, 8]
    assert t["rows"]["params"]["base"] == count_params(base)
    assert t["rows"]["params"]["reached"] == count_params(thin)
    assert t["met"] == (count_params(thin) <= 0.5 * count_params(base))
    assert out["ratio"] == 0.55  # every group: (2 + 4 + 8 + 3 x 2 + 6 x 4) / 80 = 44 / 80


@pytest.mark.usefixtures("quick_timer")
def test_widths_reached_counts_at_the_targets_resolution_over_its_groups() -> None:
    base, thin = net(), net(THIN)
    cfg = composed("prune.target=flops:0.5", "prune.resolution=16", "prune.exclude=[layer3]")
    out = widths_reached(cfg, base, thin, INFO)
    rows = out["target"]["rows"]
    assert out["target"]["resolution"] == [16, 16]
    assert rows["flops"]["base"] == count_macs(base, (1, 16, 16))
    assert rows["flops"]["reached"] == count_macs(thin, (1, 16, 16))
    assert out["ratio"] == 0.5  # 36 / 72: layer3 (kept whole) is not one of its groups
