"""No false exclusions (issue 22.4): a Python number added to the channels is no buffer,
a frozen layer excludes its group with that reason, and a wrong example input is
refused with the model's own error, in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csgd_cli
from csgd_cli.common.errors import CsgdError
from csgd_cli.tracing.trace import channel_groups


class ScalarAdds(nn.Module):
    """Python numbers on the channels, as timm's MobileOneBlock (``out += 0``) does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = 0
        out = 0
        out += self.bn1(self.conv1(x))  # int + tensor
        out += identity  # tensor += int
        y = self.conv2(out * 2.0 - 1) + 0.5
        return self.head(y.mean((2, 3)))


class BufferAdd(ScalarAdds):
    """A per-channel buffer added to the channels: a true exclusion (it keeps its width)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn1(self.conv1(x)) + self.shift)
        return self.head(y.mean((2, 3)))


def _groups(model: nn.Module, x: torch.Tensor) -> dict[str, str | None]:
    return {g.name: g.excluded for g in channel_groups(model, x)}


def test_python_numbers_are_not_constant_tensors() -> None:
    assert _groups(ScalarAdds(), torch.randn(2, 3, 8, 8)) == {"conv1": None, "conv2": None}


def test_a_per_channel_buffer_still_excludes_its_group() -> None:
    got = _groups(BufferAdd(), torch.randn(2, 3, 8, 8))
    assert got["conv2"] is None
    assert "constant tensor" in (got["conv1"] or "")


def test_frozen_layers_exclude_their_groups_with_that_reason() -> None:
    model = ScalarAdds()
    model.conv1.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)
    pruner = csgd_cli.CSGD(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    why = pruner.excluded()
    assert list(why) == ["conv1"]
    assert "frozen (requires_grad=False)" in why["conv1"] and "conv1.weight" in why["conv1"]
    assert list(pruner.clusters) == ["conv2"]
    opt = pruner.optimizer(lr=0.1, epsilon=1.0)  # the unfrozen group trains as usual
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    before = model.conv1.weight.clone()
    opt.step()
    assert torch.equal(model.conv1.weight, before)  # a frozen layer stays frozen
    # the frozen group is left whole by the merge, the other one is thinned
    assert pruner.merge(force=True).conv2.out_channels == 4


@pytest.mark.parametrize(
    ("x", "says"),
    [
        (torch.randn(3, 8, 8), "expected 4D input (got 3D input)"),  # no batch dim
        ([torch.randn(1, 3, 8, 8)] * 2, "positional argument"),  # a list for one tensor
        ({"images": torch.randn(1, 3, 8, 8)}, "unexpected keyword argument"),
    ],
    ids=["3-d", "list", "dict"],
)
def test_a_wrong_example_input_is_refused_with_the_models_own_error(x: object, says: str) -> None:
    with pytest.raises(CsgdError) as e:
        csgd_cli.CSGD(ScalarAdds(), x, ratio=0.5)
    msg = str(e.value)
    assert "\n" not in msg and "its forward fails on the example input (" in msg and says in msg
    assert "plain tensor computation" not in msg and "no prunable" not in msg


timm = pytest.importorskip("timm")


def test_timm_mobileone_is_pruned_not_refused() -> None:
    model = timm.create_model("mobileone_s0", num_classes=10).eval()
    pruner = csgd_cli.CSGD(model, torch.randn(1, 3, 64, 64), ratio=0.5, clustering="even")
    assert pruner.excluded() == {}
    assert len(pruner.clusters) == len(pruner.groups) == 4
    assert "stem.conv_kxk.0.conv" in pruner.clusters


def test_timm_fastvit_keeps_its_stem_group() -> None:
    model = timm.create_model("fastvit_t8", num_classes=10).eval()
    why = _groups(model, torch.randn(1, 3, 64, 64))
    assert not any("constant tensor" in (w or "") for w in why.values())
    # the stem's channels run through stage 0 into a grouped conv (48 groups of 1 -> 2
    # channels) and a free layer-scale parameter: true reasons, never a Python number
    assert why["stem.0.conv_kxk.0.conv"] is not None
    assert why["stages.0.blocks.0.mlp.fc1"] is None


def test_timm_fastvit_lists_each_group_once_and_merges() -> None:
    """Two roots of one excluded group (fastvit's large and small grouped convs) give one
    group, not two of the same name that the merge cannot tell apart."""
    model = timm.create_model("fastvit_t8", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner = csgd_cli.CSGD(model, x, ratio=0.5, clustering="even")
    names = [g.name for g in pruner.groups]
    assert len(names) == len(set(names)) and not any("@" in n for n in names)
    thin = pruner.merge(x, force=True)  # the widths of every group, by name
    assert thin(x).shape == (2, 10)
