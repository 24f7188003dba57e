"""Layer scales (rules/scales.py): timm's ``LayerScale``/``LayerScale2d`` and MetaFormer's
``Scale`` are per-channel members of their group, so a residual stream scaled by one
(EfficientFormer, PoolFormer) prunes and merges exactly instead of being excluded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csgd_cli as csgd

timm = pytest.importorskip("timm")
from timm.layers.layer_scale import LayerScale, LayerScale2d  # noqa: E402
from timm.models.metaformer import Scale  # noqa: E402


class Scaled(nn.Module):
    """A stem, then a residual block whose branch ends in a layer scale (NCHW), an MLP
    over NHWC tokens scaled by ``LayerScale``, and a MetaFormer ``Scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.ls2d = LayerScale2d(8, 0.5)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.ls = LayerScale(12, 0.5)
        self.scale = Scale(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = x + self.ls2d(self.branch(torch.relu(x)))
        t = x.permute(0, 2, 3, 1)
        t = t + self.fc2(self.ls(torch.relu(self.fc1(t))))
        x = self.scale(t.permute(0, 3, 1, 2))
        return self.head(x.mean((2, 3)))


def _nontrivial(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("gamma", "scale.scale")):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        m.bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)


def test_layer_scales_are_channel_members_and_merge_exactly() -> None:
    torch.manual_seed(0)
    model = Scaled().double().eval()
    _nontrivial(model)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    groups = {g.name: g for g in csgd.channel_groups(model, x)}
    stream, hidden = groups["stem"], groups["fc1"]
    assert stream.excluded is None and hidden.excluded is None
    members = {(m.module, m.kind) for g in (stream, hidden) for m in g.members}
    assert {("ls2d", "channel"), ("scale", "channel"), ("ls", "channel")} <= members

    pruner = csgd.CSGD(model, x, ratio=0.5, clustering="even")
    opt = pruner.optimizer(lr=1.0, epsilon=1.0, norm_epsilon=1.0, momentum=0.0,
                           weight_decay=0.0, plain_norm_weight_decay=0.0)  # fmt: skip
    opt.zero_grad()
    (model(x) * 0.0).sum().backward()
    opt.step()  # lr x epsilon = 1: every cluster at its mean
    check = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = model(check)
    thin = pruner.merge(check)
    with torch.no_grad():
        after = thin.eval()(check)
    assert torch.allclose(after, before, rtol=0, atol=1e-10 * before.abs().max().item())
    assert thin.ls2d.gamma.shape == (4,) and thin.ls.gamma.shape == (6,)
    assert thin.scale.scale.shape == (4,) and thin.scale.shape == (4, 1, 1)


def test_a_subclass_of_a_layer_scale_is_still_refused_with_its_reason() -> None:
    class Mine(LayerScale2d):  # may change the forward: not matched
        pass

    model = Scaled().eval()
    model.ls2d = Mine(8, 0.5)
    groups = {g.name: g for g in csgd.channel_groups(model, torch.randn(2, 3, 6, 6))}
    assert "a reshape/view of the channels in 'ls2d' (Mine)" in (groups["stem"].excluded or "")
