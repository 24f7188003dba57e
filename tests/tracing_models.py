"""Small networks for the tracing tests: every coupling kind csgd maps, and ones it must
exclude (importable as ``tests.tracing_models.<builder>`` for ``model=custom``)."""

from __future__ import annotations

import torch
from torch import nn


class SE(nn.Module):
    """Squeeze-excitation: the expanding conv writes a per-channel scale of the group."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c, r, 1)
        self.expand = nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.squeeze(s))))


class Mixed(nn.Module):
    """Residual add, concatenation, depthwise conv, SE, flatten of a 4x4 map into a linear
    layer: ``y = SE(bn(dw(cat[b(x), c(x)])))``, ``x = x + bn(proj(y))``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16,
                 width: int = 8) -> None:  # fmt: skip
        super().__init__()
        w = width
        self.input_shape = (in_channels, image_size, image_size)
        self.stem = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.b = nn.Conv2d(w, 2 * w, 1, bias=False)
        self.c = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(3 * w, 3 * w, 3, padding=1, groups=3 * w, bias=False)
        self.bn1 = nn.BatchNorm2d(3 * w)
        self.se = SE(3 * w)
        self.proj = nn.Conv2d(3 * w, w, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.head = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * w * (image_size // 8) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.dw(torch.cat([self.b(x), self.c(x)], 1))))
        x = x + self.bn2(self.proj(self.se(y)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.head(x)), 4)
        return self.fc(torch.flatten(x, 1))


class Grouped(nn.Module):
    """A grouped (non-depthwise) conv: the groups it reads and writes are excluded."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16) -> None:
        super().__init__()
        del image_size
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv3(torch.relu(x)))
        return self.fc(x.mean((2, 3)))


class Shuffle(nn.Module):
    """A channel shuffle and a GroupNorm: both couplings are excluded, the rest pruned."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16) -> None:
        super().__init__()
        del image_size
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = torch.relu(self.gn(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def mixed(**kw: object) -> nn.Module:
    return Mixed(**kw)  # type: ignore[arg-type]


def not_a_module(**kw: object) -> object:
    return "not a module"


class Untraceable(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward pass always fails")
