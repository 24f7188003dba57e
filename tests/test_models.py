"""Model registry and the CIFAR ResNet family."""

from __future__ import annotations

import pytest
import torch

from csgd_cli import get_model, list_models
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.nets import count_params
from csgd_cli.tracing.trace import channel_groups


@pytest.mark.parametrize(("name", "params"), [("resnet20", 272_474), ("resnet56", 855_770)])
def test_resnet_parameter_counts(name: str, params: int) -> None:
    assert count_params(get_model(name, num_classes=10)) == params


def test_registry_lists_the_families() -> None:
    names = list_models()
    for n in ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16", "densenet40"):
        assert n in names
    with pytest.raises(CsgdError, match="resnet56"):
        get_model("resnet57")


def test_thin_resnet_is_the_same_class_with_smaller_widths() -> None:
    full = get_model("resnet20", num_classes=7, in_channels=1)
    widths = [w // 2 for w in full.widths]
    thin = get_model("resnet20", num_classes=7, in_channels=1, widths=widths)
    assert type(thin) is type(full) and thin.widths == widths
    assert thin(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert thin.arch == {
        "name": "resnet20",
        "kwargs": {"num_classes": 7, "in_channels": 1, "widths": widths},
    }


def test_resnet_groups_couple_each_stage() -> None:
    groups = channel_groups(get_model("resnet56"))
    assert len(groups) == 3 + 27
    stage2 = next(g for g in groups if g.name == "layer2")
    convs = {p.conv for p in stage2.producers}
    # the projection shortcut and every block's second conv share the stage's clustering
    assert "layer2.0.shortcut.0" in convs and {f"layer2.{b}.conv2" for b in range(9)} <= convs
    assert {c.module for c in stage2.consumers} >= {
        "layer3.0.conv1",
        "layer3.0.shortcut.0",
        "layer2.8.conv1",
    }
    assert "layer2.0.conv1" not in {c.module for c in stage2.consumers}
