"""CIFAR ResNets (He et al. 2016): basic blocks, 1x1 conv + BN projection shortcuts.

Built from an explicit width spec, one entry per channel group, so a merged (thinner)
network is the same class with smaller widths:
``widths = [stage1, stage2, stage3] + [inner width of every block, in order]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..rules.groups import ChannelGroup, producer, reader
from . import kaiming_init, register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if project
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    base_widths = (16, 32, 64)

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] | None = None,
        image_size: int = 32,  # accepted for a uniform builder; global pooling makes it moot
    ) -> None:
        super().__init__()
        del image_size
        if (depth - 2) % 6 != 0:
            raise TypeError(f"depth must be 6n+2 (20, 32, 56, 110), got {depth}")
        self.depth, self.blocks_per_stage = depth, (depth - 2) // 6
        n = self.blocks_per_stage
        if widths is None:
            widths = list(self.base_widths) + [w for w in self.base_widths for _ in range(n)]
        if len(widths) != 3 + 3 * n:
            raise TypeError(f"widths needs {3 + 3 * n} entries for depth {depth}")
        self.widths = [int(w) for w in widths]
        stage_w, inner_w = self.widths[:3], self.widths[3:]
        self.conv1 = nn.Conv2d(in_channels, stage_w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_w[0])
        cin, stages = stage_w[0], []
        for s in range(3):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                # Projection decided by structure, not width, so thin nets keep the layout.
                blocks.append(
                    BasicBlock(cin, inner_w[s * n + b], stage_w[s], stride, s > 0 and b == 0)
                )
                cin = stage_w[s]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stage_w[2], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per residual stage (all convs meeting in its sums), one per inner conv."""
        n, groups, inner = self.blocks_per_stage, [], []
        for s in range(3):
            stage = f"layer{s + 1}"
            members = producer("conv1", "bn1") if s == 0 else []
            for b in range(n):
                blk = f"{stage}.{b}"
                if s > 0 and b == 0:
                    members += producer(f"{blk}.shortcut.0", f"{blk}.shortcut.1")
                members += producer(f"{blk}.conv2", f"{blk}.bn2")
                if s == 0 or b > 0:  # block 0 of later stages reads the previous stage
                    members += reader(f"{blk}.conv1")
                inner.append(
                    ChannelGroup(
                        f"{blk}.conv1",
                        self.widths[3 + s * n + b],
                        producer(f"{blk}.conv1", f"{blk}.bn1") + reader(f"{blk}.conv2"),
                    )
                )
            if s < 2:
                nxt = f"layer{s + 2}.0"
                members += reader(f"{nxt}.conv1") + reader(f"{nxt}.shortcut.0")
            else:
                members += reader("fc")
            groups.append(ChannelGroup(stage, self.widths[s], members))
        return groups + inner


for _depth in (20, 32, 44, 56, 110):

    def _make(depth: int = _depth, **kw: object) -> CifarResNet:
        return CifarResNet(depth=depth, **kw)  # type: ignore[arg-type]

    register_model(f"resnet{_depth}")(_make)
