"""Unit tests of ``csgd_cli.rules.queries``: what other floors ask about a layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.rules.layers import rule_for
from csgd_cli.rules.queries import (
    WEIGHTED_TYPES,
    channel_dim,
    channels_last,
    image_channels,
    in_width,
    is_batchnorm,
    is_plain_conv,
    out_width,
    plain_batchnorm2d,
    scored_by,
    timed_conv,
    weighted,
)


class SubBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass (it may compute otherwise: not a plain one)."""


# Stand-ins named as optional packages' classes: their rules match by that name
# (``rules.base.subclass_of``), so these tests import neither torchvision nor timm;
# tests/test_layers.py checks the real classes against the same rules.
class FrozenBN(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        for k in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(k, torch.ones(n))


class BatchNormAct(nn.BatchNorm2d):
    pass


class StdConv(nn.Conv2d):
    pass


for cls, module, name in (
    (FrozenBN, "torchvision.ops.misc", "FrozenBatchNorm2d"),
    (BatchNormAct, "timm.layers.norm_act", "BatchNormAct2d"),
    (StdConv, "timm.layers.std_conv", "StdConv2d"),
):
    cls.__module__, cls.__qualname__ = module, name


def test_the_stand_ins_meet_the_rules_they_are_named_for() -> None:
    stand_ins = (FrozenBN(2), BatchNormAct(2), StdConv(2, 2, 1))
    names = [r.name if (r := rule_for(m)) else None for m in stand_ins]
    assert names == ["frozen batchnorm", "batchnorm+act", "weight-standardised conv"]


def test_weighted_layers_are_convs_and_linears_only() -> None:
    for m in (nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv3d(3, 4, 1), nn.Linear(3, 4)):
        assert weighted(m), type(m)
        assert isinstance(m, WEIGHTED_TYPES)
    assert weighted(nn.Conv2d(6, 6, 3, groups=6))  # depthwise: still kernel x positions
    # a transposed conv's cost scales with input positions: not modelled
    for m in (nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4), nn.ReLU(), nn.Identity()):
        assert not weighted(m), type(m)


@pytest.mark.parametrize(
    ("module", "fn"),
    [
        (nn.Conv2d(3, 4, 3), "prune_conv_out_channels"),
        (nn.Conv2d(4, 4, 3, groups=4), "prune_conv_out_channels"),
        (nn.Linear(3, 4), "prune_linear_out_channels"),
        (nn.BatchNorm2d(4), "prune_batchnorm_out_channels"),
        (nn.BatchNorm1d(4), "prune_batchnorm_out_channels"),
        (SubBN(4), "prune_batchnorm_out_channels"),
        (nn.ConvTranspose2d(3, 4, 2), None),
        (nn.GroupNorm(4, 4), None),
        (nn.PReLU(4), None),
        (nn.ReLU(), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_scored_by_names_torch_prunings_function(module: nn.Module, fn: str | None) -> None:
    assert scored_by(module) == fn


def test_channel_dim_and_channels_last() -> None:
    assert channel_dim(nn.Conv2d(3, 4, 3)) == 1
    assert channel_dim(nn.ConvTranspose2d(3, 4, 2)) == 1
    assert channel_dim(nn.Linear(3, 4)) == -1  # token-wise: channels last
    assert channel_dim(nn.BatchNorm2d(4)) is None  # keeps its input's dim
    assert channel_dim(nn.ReLU()) is None
    assert channels_last(nn.Linear(3, 4))
    assert not channels_last(nn.Conv2d(3, 4, 3))
    assert not channels_last(nn.LayerNorm(4))  # per-channel, not a producer
    assert not channels_last(nn.Identity())


@pytest.mark.parametrize(
    ("module", "out", "inp"),
    [
        (nn.Conv2d(6, 4, 3), 4, 6),
        (nn.Conv2d(6, 4, 3, groups=2), 4, 6),  # weight (4, 3, ...): inputs x groups
        (nn.Conv2d(6, 6, 3, groups=6), 6, 6),  # depthwise: weight (6, 1, ...)
        (nn.Conv1d(5, 7, 3), 7, 5),
        (nn.ConvTranspose2d(6, 4, 2), 4, 6),  # weight (in, out, ...)
        (nn.ConvTranspose2d(6, 4, 2, groups=2), 4, 6),  # weight (6, 2, ...): out = 2 x 2
        (nn.Linear(6, 4), 4, 6),
        (nn.Linear(6, 4, bias=False), 4, 6),
    ],
    ids=["conv", "grouped", "depthwise", "conv1d", "tconv", "grouped_tconv", "linear", "nobias"],
)
def test_producer_widths_read_from_its_weight(module: nn.Module, out: int, inp: int) -> None:
    assert (out_width(module), in_width(module)) == (out, inp)


def test_widths_follow_a_resized_weight_not_the_constructor_attributes() -> None:
    """After a merge the tensors carry the width (the attributes may lag)."""
    conv = nn.Conv2d(6, 4, 3)
    conv.weight = nn.Parameter(torch.zeros(3, 5, 3, 3))
    assert (out_width(conv), in_width(conv)) == (3, 5)


def test_image_channels_only_for_2d_producers() -> None:
    assert image_channels(nn.Conv2d(3, 8, 3)) == 3
    assert image_channels(nn.Conv2d(4, 8, 3, groups=2)) == 4
    assert image_channels(nn.ConvTranspose2d(5, 8, 2)) == 5
    assert image_channels(nn.Conv1d(3, 8, 3)) is None  # reads (N, C, L)
    assert image_channels(nn.Conv3d(3, 8, 1)) is None
    assert image_channels(nn.Linear(3, 8)) is None  # channels last
    assert image_channels(nn.BatchNorm2d(3)) is None  # not a producer
    assert image_channels(nn.ReLU()) is None


def test_timed_conv_is_for_2d_convs_and_says_if_depthwise() -> None:
    assert timed_conv(nn.Conv2d(3, 8, 3)) is False
    assert timed_conv(nn.Conv2d(8, 8, 3, groups=8)) is True
    assert timed_conv(nn.Conv2d(8, 8, 3, groups=2)) is False  # grouped, not depthwise
    assert timed_conv(nn.Conv2d(1, 1, 3, groups=1)) is False  # one channel: a plain conv
    assert timed_conv(nn.Conv1d(8, 8, 3, groups=8)) is None
    assert timed_conv(nn.ConvTranspose2d(8, 8, 2)) is None  # not weighted
    assert timed_conv(nn.Linear(3, 8)) is None
    assert timed_conv(nn.BatchNorm2d(8)) is None


def test_is_batchnorm_and_plain_batchnorm2d() -> None:
    for m in (nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4), SubBN(4)):
        assert is_batchnorm(m), type(m)
    # frozen BN has no trained gammas; the other norms are not BatchNorms
    for m in (FrozenBN(4), nn.InstanceNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4)):
        assert not is_batchnorm(m), type(m)
    assert plain_batchnorm2d(nn.BatchNorm2d(4))
    for m in (SubBN(4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4), FrozenBN(4)):
        assert not plain_batchnorm2d(m), type(m)


def test_is_plain_conv() -> None:
    for m in (nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4)):
        assert is_plain_conv(m), m
    for m in (nn.ConvTranspose2d(3, 4, 2), nn.Linear(3, 4), nn.BatchNorm2d(4)):
        assert not is_plain_conv(m), m


def test_optional_packages_layers_answer_through_their_rules() -> None:
    std = StdConv(3, 8, 3)
    assert weighted(std) and channel_dim(std) == 1 and isinstance(std, WEIGHTED_TYPES)
    assert not is_plain_conv(std)  # weight-standardised: BN does not fold into it
    assert timed_conv(std) is False and image_channels(std) == 3
    assert (out_width(std), in_width(std)) == (8, 3)
    bn_act = BatchNormAct(4)
    assert is_batchnorm(bn_act) and not plain_batchnorm2d(bn_act)  # a subclass, with an act
    assert scored_by(bn_act) == "prune_batchnorm_out_channels"
    frozen = FrozenBN(4)  # no trained gammas: not scored, not a producer
    assert scored_by(frozen) is None and channel_dim(frozen) is None and not weighted(frozen)
