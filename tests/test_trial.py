"""core/trial.py: a network whose forward reads a width as a number (timm's LambdaLayer
reshapes its output to ``x.shape[1]`` channels) traces as prunable, but its thin network
cannot run: ``CSGD(...)`` refuses the group before training, in one line naming it,
instead of a traceback in the merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csgd_cli as csgd


class ReadsWidth(nn.Module):
    """``a`` writes 8 channels; ``b``'s 8 (in two heads: that group is excluded) are
    reshaped back to the width of its input as the forward reads it, as LambdaLayer does
    (so narrowing ``a`` alone breaks the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(torch.relu(self.stem(x))))
        n, c, hh, ww = h.shape  # c: a Python int, which the trace cannot see
        y = self.b(h).reshape(n, 2, 4, hh * ww).reshape(n, c, hh, ww)
        return self.head(y).mean((2, 3))


def test_a_group_whose_merge_breaks_the_forward_is_refused_before_training() -> None:
    torch.manual_seed(0)
    model = ReadsWidth().eval()
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in csgd.channel_groups(model, x)}
    assert groups["a"].excluded is None and groups["b"].excluded  # b: the heads
    with pytest.raises(csgd.CsgdError, match=r"fails once groups 'a' are narrowed") as e:
        csgd.CSGD(model, x, ratio=0.5, clustering="even")
    assert "exclude=['a']" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(csgd.CsgdError, match="'a'"):  # the guessed input: the same check
        csgd.CSGD(model, ratio=0.5, clustering="even")


def test_excluding_the_named_group_trains_and_merges_exactly() -> None:
    torch.manual_seed(0)
    model = ReadsWidth().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruner = csgd.CSGD(model, x, ratio=0.5, clustering="even", exclude=["a"])
    assert list(pruner.clusters) == ["stem"]  # the rest still prunes
    opt = pruner.optimizer(lr=1.0, epsilon=1.0, norm_epsilon=1.0, momentum=0.0,
                           weight_decay=0.0, plain_norm_weight_decay=0.0)  # fmt: skip
    opt.zero_grad()
    (model(x) * 0.0).sum().backward()
    opt.step()
    with torch.no_grad():
        before = model(x)
    thin = pruner.merge(x)
    with torch.no_grad():
        assert torch.allclose(thin(x), before, rtol=0, atol=1e-12)
