"""``load_model(path, model=...)`` with a model whose shapes differ from the file's
(issue 22.8): one line naming the tensor and both shapes, never a silently resized net;
a merged file still loads into a fresh instance of its own class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError


class Net(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _merged(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = Net(5)
    thin = csgd.CSGD(net, X, ratio=0.5).merge(force=True)
    return csgd.save(thin, tmp_path / "pruned.pt")


@pytest.mark.parametrize("merged", [False, True], ids=["base_file", "merged_file"])
def test_another_class_count_is_refused_in_one_line(tmp_path: Path, merged: bool) -> None:
    torch.manual_seed(0)
    path = _merged(tmp_path) if merged else csgd.save(Net(5), tmp_path / "base.pt")
    with pytest.raises(CsgdError) as e:
        csgd.load_model(path, model=Net(num_classes=7))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert "fc.weight" in msg or "fc.bias" in msg, msg
    assert "[5" in msg and "[7" in msg, msg  # both shapes
    assert "model=" in msg  # the fix


def test_another_stem_width_of_an_unmerged_file_is_refused(tmp_path: Path) -> None:
    path = csgd.save(Net(5, width=8), tmp_path / "base.pt")
    with pytest.raises(CsgdError, match=r"conv1\.weight is \[8, 3, 3, 3\] in the file but \[12"):
        csgd.load_model(path, model=Net(5, width=12))


def test_a_merged_file_loads_into_a_fresh_instance_of_its_class(tmp_path: Path) -> None:
    path = _merged(tmp_path)
    thin = csgd.load_model(path, model=Net(5))
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert thin.conv1.out_channels < 8  # resized to the merged widths
    assert thin.fc.out_features == 5
    for k, v in thin.state_dict().items():
        assert torch.equal(v, saved[k]), k
