"""CIFAR pre-activation bottleneck ResNet (He et al. 2016, "Identity Mappings"), e.g.
ResNet-164: depth 9n+2, bottlenecks BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1
(x4 expansion), stages of 16/32/64 planes, a final BN-ReLU before the pool.

Groups are traced. The pre-activation coupling: a stage's residual stream is written by
the projection shortcut and every block's last conv, and *normalised* by every block's
first BN (and the final BN), so those BNs are per-channel members of the stream's group
(centripetal, sliced), not producers' norms; each block's first two convs are their own
groups with the BN that follows them.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 16,
    ) -> None:
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise TypeError(f"depth must be 9n+2 (e.g. 56, 110, 164), got {depth}")
        n = (depth - 2) // 9
        self.input_shape = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        cin = width
        for s in range(3):
            planes = width * 2**s
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(PreActBottleneck(cin, planes, stride, project=b == 0))
                cin = planes * PreActBottleneck.expansion
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(x))), 1))


@register_model("resnet164")
def resnet164(depth: int = 164, **kw: object) -> PreActResNet:
    return PreActResNet(depth=depth, **kw)  # type: ignore[arg-type]
