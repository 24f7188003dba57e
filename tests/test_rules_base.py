"""Unit tests of ``csgd_cli.rules.base``: the LayerRule shape, subclass_of, with_bias, with_versions."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from csgd_cli.rules import layers, queries
from csgd_cli.rules.base import LayerRule, subclass_of, with_bias, with_versions


class SubBN(nn.BatchNorm2d):
    pass


# -- subclass_of -----------------------------------------------------------------------------
def test_subclass_of_matches_the_named_class_and_its_subclasses() -> None:
    is_bn2d = subclass_of("torch.nn.modules.batchnorm.BatchNorm2d")
    assert is_bn2d(nn.BatchNorm2d(2)) and is_bn2d(SubBN(2))
    assert not is_bn2d(nn.BatchNorm1d(2))  # a sibling, not a subclass
    assert not is_bn2d(nn.SyncBatchNorm(2))
    is_any_bn = subclass_of("torch.nn.modules.batchnorm._BatchNorm")
    assert all(is_any_bn(m) for m in (nn.BatchNorm1d(2), SubBN(2), nn.SyncBatchNorm(2)))
    assert not is_any_bn(nn.InstanceNorm2d(2))  # another norm base


def test_subclass_of_takes_several_names_and_needs_the_full_path() -> None:
    either = subclass_of("torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d")
    assert either(nn.Linear(2, 2)) and either(nn.Conv1d(2, 2, 1))
    assert not either(nn.Conv2d(2, 2, 1))
    assert not subclass_of("Linear")(nn.Linear(2, 2))  # a bare class name is not a path
    assert not subclass_of("torch.nn.Linear")(nn.Linear(2, 2))  # the defining module counts


def test_subclass_of_an_uninstalled_package_never_matches_and_imports_nothing() -> None:
    match = subclass_of("no_such_package_xyz.layers.Norm")
    assert not match(nn.BatchNorm2d(2)) and not match(nn.Identity())


# -- with_bias -------------------------------------------------------------------------------
def test_with_bias_adds_the_bias_only_when_the_module_has_one() -> None:
    spec = ("weight", 0, "kernel")
    assert with_bias(nn.Conv2d(2, 3, 1), spec) == [spec, ("bias", 0, "affine")]
    assert with_bias(nn.Conv2d(2, 3, 1, bias=False), spec) == [spec]  # bias is None
    assert with_bias(nn.ReLU(), spec) == [spec]  # no bias attribute at all
    tspec = ("weight", 1, "kernel")  # the bias is always along dim 0, whatever the weight's
    assert with_bias(nn.ConvTranspose2d(2, 3, 2), tspec) == [tspec, ("bias", 0, "affine")]


# -- with_versions ---------------------------------------------------------------------------
class Versioned(nn.Module):
    """Refuses a state dict without its version (as torchvision's MNASNet does)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def _load_from_state_dict(self, sd: Any, prefix: str, meta: dict, *args: Any) -> None:
        if meta.get("version") != 2:
            raise RuntimeError("no version")
        super()._load_from_state_dict(sd, prefix, meta, *args)


def test_with_versions_lets_a_version_checking_layer_load_a_built_dict() -> None:
    model = nn.Sequential(Versioned())
    built = {"0.w": torch.arange(3.0)}  # a dict built by a merge: no _metadata
    with pytest.raises(RuntimeError, match="no version"):
        model.load_state_dict(built)
    sd = with_versions(built, model.state_dict())
    assert sd is not built and not hasattr(built, "_metadata")  # the input is not touched
    assert sd["0.w"] is built["0.w"]  # the same tensors, no copy
    model.load_state_dict(sd)
    assert torch.equal(model[0].w, torch.arange(3.0))


def test_with_versions_keeps_a_dict_that_has_its_own() -> None:
    model = nn.Sequential(Versioned())
    own = model.state_dict()
    assert with_versions(own, nn.Sequential(nn.Linear(1, 1)).state_dict()) is own
    bare = with_versions({"0.w": torch.ones(3)}, OrderedDict())  # the model's has none
    assert isinstance(bare, OrderedDict) and bare._metadata is None  # type: ignore[attr-defined]


# -- LayerRule -------------------------------------------------------------------------------
class Scale(nn.Module):
    """A layer no rule knows: one weight per channel."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


def _scale_rule(**kw: Any) -> LayerRule:
    return LayerRule(
        "scale",
        lambda m: isinstance(m, Scale),
        lambda m, out: "channel",
        lambda m, kind: [("weight", 0, "affine")],
        lambda m, sd, p: None,
        **kw,
    )


def test_a_rule_with_only_its_required_fields_is_a_plain_per_channel_layer() -> None:
    r = _scale_rule()
    assert r.own_ops == frozenset() and r.groups is None and r.refit is None
    assert (r.weighted, r.scored_by, r.channel_dim) == (False, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weighted = True  # type: ignore[misc]


def test_queries_answer_from_the_rule_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer is what its rule says it is: the same module, two rules."""
    m = Scale(4)
    assert layers.rule_for(m) is None and not queries.weighted(m)
    monkeypatch.setattr(layers, "RULES", [_scale_rule(), *layers.RULES])
    assert layers.rule_for(m).name == "scale"  # type: ignore[union-attr]
    assert not queries.weighted(m) and queries.channel_dim(m) is None
    assert queries.scored_by(m) is None and not queries.is_batchnorm(m)
    producer = _scale_rule(weighted=True, scored_by="prune_x", channel_dim=-1)
    monkeypatch.setattr(layers, "RULES", [producer, *layers.RULES])
    assert queries.weighted(m) and queries.channels_last(m)
    assert queries.scored_by(m) == "prune_x" and queries.out_width(m) == 4
    assert queries.image_channels(m) is None  # channels last: not an image reader
