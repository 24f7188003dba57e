"""Every layer kind the tracer accepts has a rule that the optimizer's rows and the
merge's resize both follow (accepted implies resizable)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from csgd_cli.rules.attention import ATTENTION_RULES
from csgd_cli.rules.decoder_attention import DECODER_RULES
from csgd_cli.rules.groups import ChannelGroup, Member
from csgd_cli.rules.layers import (
    KINDS,
    RULES,
    fit_to_state_dict,
    member_kind,
    member_tensors,
    rule_for,
    segment_rows,
)


# -- one rule per layer kind -----------------------------------------------------------
class SubBN(nn.BatchNorm2d):
    """A BatchNorm subclass (timm's BatchNormAct2d, frozen or sync BN are the same)."""


def _zoo() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """One module of every kind csgd knows, and an input shape for it (channels 6)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    img = (2, 6, 5, 5)
    return [
        (nn.Conv2d(6, 4, 3, padding=1), img),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True), img),  # depthwise
        (nn.Conv1d(6, 4, 3), (2, 6, 7)),
        (nn.Conv3d(6, 4, 1), (2, 6, 3, 3, 3)),
        (nn.ConvTranspose2d(6, 4, 2, stride=2), img),  # outputs: dim 1 of its weight
        (nn.Linear(6, 4), (2, 6)),
        (nn.BatchNorm2d(6), img),
        (nn.BatchNorm1d(6), (2, 6)),
        (SubBN(6), img),
        (nn.SyncBatchNorm(6), img),
        (FrozenBatchNorm2d(6), img),
        (nn.InstanceNorm2d(6, affine=True), img),
        (nn.GroupNorm(6, 6), img),
        (nn.PReLU(6), img),
        *_timm_zoo(img),
    ]


def _timm_zoo(img: tuple[int, ...]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """timm's layer kinds (timm is an optional extra; the dev extra installs it)."""
    try:
        from timm.layers import (
            BatchNormAct2d,
            FrozenBatchNormAct2d,
            GroupNormAct,
            ScaledStdConv2d,
            StdConv2d,
            SyncBatchNormAct,
        )
        from timm.layers.layer_scale import LayerScale, LayerScale2d
        from timm.layers.linear import Linear
        from timm.models.fastvit import LayerScale2d as FastVitScale
        from timm.models.metaformer import Scale
    except ImportError:
        return []
    return [
        (BatchNormAct2d(6, act_layer=nn.SiLU), img),
        (SyncBatchNormAct(6), img),
        (FrozenBatchNormAct2d(6), img),
        (GroupNormAct(6, 6), img),  # a GroupNorm subclass: the groupnorm rule
        (ScaledStdConv2d(6, 4, 3, padding=1), img),  # input side excluded: see below
        (StdConv2d(6, 6, 3, padding=1, groups=6), img),  # depthwise: per channel
        (Linear(6, 4), (2, 6)),
        (LayerScale(6), (2, 6)),  # x * gamma over tokens: rules/scales.py
        (LayerScale2d(6), img),  # x * gamma.view(1, -1, 1, 1)
        (Scale(6), img),  # MetaFormer's: its view shape is refit
        (FastVitScale(6), img),  # gamma (C, 1, 1)
    ]


def _shrunk(m: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The module's state dict with the last channel of every tensor its member of
    ``kind`` touches removed (what a merge of two channels leaves)."""
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for name, dim, _ in member_tensors(m, kind):
        sd[name] = sd[name].narrow(dim, 0, sd[name].shape[dim] - 1)
    return sd


@pytest.mark.parametrize("idx", range(len(_zoo())))
def test_every_accepted_kind_has_tensors_rows_and_a_resize(idx: int) -> None:
    """For each kind the rule accepts, its tensors shrink by one channel and the fresh
    module is resized to them by the same rule, and still runs (accepted => resizable)."""
    m, shape = _zoo()[idx]
    rule = rule_for(m)
    assert rule is not None, type(m)
    kinds = {member_kind(m, out) for out in (True, False)} & set(KINDS)
    assert kinds, f"{type(m).__name__}: the rule accepts no kind"
    for kind in kinds:
        sd = _shrunk(m, kind)
        fresh = fit_to_state_dict(copy.deepcopy(m), sd)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
        x = torch.randn(*shape)
        if kind in ("in", "channel"):  # it reads one channel fewer
            x = x.narrow(1, 0, x.shape[1] - 1)
        fresh.eval()(x)
        if kind != "in":  # centripetal rows: one per channel, as the optimizer takes them
            g = ChannelGroup("g", 5, [Member("m", kind)])
            wrapper = nn.Module()
            wrapper.m = fresh
            blocks = segment_rows(wrapper, ChannelGroup("g", 5, g.members), ("kernel", "affine"))
            assert all(r.n == 5 for _, _, rs in blocks for r in rs)


def test_the_rule_table_covers_its_zoo_and_refuses_what_it_cannot_merge() -> None:
    pytest.importorskip("timm")  # the table has rules for timm's layers
    # attention and norms over the channels: tests/test_attention.py, test_decoder_heads.py
    covered = {r.name for r in RULES if r not in ATTENTION_RULES + DECODER_RULES}
    assert {rule_for(m).name for m, _ in _zoo()} == covered  # type: ignore[union-attr]
    assert member_kind(nn.Conv2d(4, 8, 3, groups=2), False, "c") == (
        "input of grouped conv 'c' (groups=2)"
    )
    assert member_kind(nn.ConvTranspose2d(4, 8, 2, groups=2), True, "t") == (
        "output of grouped transposed conv 't'"
    )
    assert member_kind(nn.GroupNorm(2, 8), True, "gn") == (
        "GroupNorm 'gn' has no per-channel merge rule"
    )
    assert member_kind(nn.LayerNorm(8), True, "ln").startswith(
        "LayerNorm 'ln' normalises over the channels"
    )
    assert member_kind(nn.PReLU(), True, "a") == "PReLU 'a' has one slope for every channel"
    with pytest.raises(Exception, match="cannot be a 'in' member"):
        member_tensors(nn.BatchNorm2d(4), "in")
