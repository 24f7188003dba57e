"""CIFAR DenseNet (Huang et al. 2017) without bottleneck or compression, as in C-SGD.

Stem conv3x3 -> 3 dense blocks of ``n = (depth - 4) / 3`` layers (BN-ReLU-conv3x3,
output appended to the block's concatenation) with transitions in between
(BN-ReLU-conv1x1-avgpool2) -> BN-ReLU-global avg pool-Linear.

Built from an explicit width spec, one entry per conv (each conv is its own group):
``widths = [conv0] + [every dense layer conv: dense1.0 .. dense1.{n-1}, dense2.0, ...,
dense3.{n-1}] + [trans1, trans2]``. Default: ``[16] + [growth] * 3n + [c1, c2]`` with
``c1``/``c2`` the full concatenation widths at the end of blocks 1/2 (no compression).

Groups are pre-activation: no BN normalises a conv's channels alone, so producers carry
no norm; every later BN over a concatenation holding those channels is a ``norm``
consumer and the conv right after it an ``input`` consumer, at the channel offset
where the group sits (concatenation order is [previous features, new output]).
Avg-pools that would shrink the map below 1x1 for ``image_size`` become identities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..rules.groups import ChannelGroup, producer, reader
from . import kaiming_init, register_model

N_BLOCKS = 3


class DenseLayer(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.norm(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(torch.relu(self.norm(x))))


class CifarDenseNet(nn.Module):
    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] | None = None,
        image_size: int = 32,
        stem: int = 16,
    ) -> None:
        super().__init__()
        if depth < 7 or (depth - 4) % 3 != 0:
            raise TypeError(f"depth must be 3n+4 with n >= 1 (e.g. 40, 100), got {depth}")
        n = self.layers_per_block = (depth - 4) // 3
        self.depth, self.growth = depth, growth
        if widths is None:
            c1 = stem + n * growth
            widths = [stem] + [growth] * (N_BLOCKS * n) + [c1, c1 + n * growth]
        if len(widths) != 1 + N_BLOCKS * n + N_BLOCKS - 1:
            raise TypeError(f"widths needs {N_BLOCKS * n + N_BLOCKS} entries for depth {depth}")
        self.widths = [int(w) for w in widths]
        self.conv0 = nn.Conv2d(in_channels, self.widths[0], 3, 1, 1, bias=False)
        cin, size = self.widths[0], int(image_size)
        for b in range(N_BLOCKS):
            layers = []
            for i in range(n):
                w = self.widths[1 + b * n + i]
                layers.append(DenseLayer(cin, w))
                cin += w
            self.add_module(f"dense{b + 1}", nn.Sequential(*layers))
            if b < N_BLOCKS - 1:
                w = self.widths[1 + N_BLOCKS * n + b]
                self.add_module(f"trans{b + 1}", Transition(cin, w, pool=size >= 2))
                cin, size = w, size // 2 if size >= 2 else size
        self.norm = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        for b in range(N_BLOCKS):
            x = getattr(self, f"dense{b + 1}")(x)
            if b < N_BLOCKS - 1:
                x = getattr(self, f"trans{b + 1}")(x)
        x = torch.relu(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per conv in ``widths`` order, consumed at its concatenation offset."""
        n, w = self.layers_per_block, self.widths
        dense: list[ChannelGroup] = []
        heads: list[ChannelGroup] = []  # block inputs: conv0, trans1, trans2
        for b in range(N_BLOCKS):
            blk = f"dense{b + 1}"
            # Readers of the block's concatenation after layer i: (norm, conv) pairs.
            readers = [(f"{blk}.{i}.norm", f"{blk}.{i}.conv") for i in range(n)]
            readers.append(
                (f"trans{b + 1}.norm", f"trans{b + 1}.conv") if b < N_BLOCKS - 1 else ("norm", "fc")
            )
            head = "conv0" if b == 0 else f"trans{b}.conv"
            head_w = w[0] if b == 0 else w[1 + N_BLOCKS * n + b - 1]
            # (producer, width, offset, index of the first reader)
            convs = [(head, head_w, 0, 0)]
            offset = head_w
            for i in range(n):
                convs.append((f"{blk}.{i}.conv", w[1 + b * n + i], offset, i + 1))
                offset += w[1 + b * n + i]
            for conv, width, off, first in convs:
                members = producer(conv)
                for nm, cv in readers[first:]:
                    members += reader(cv, off, norm=nm)
                group = ChannelGroup(conv, width, members)
                (heads if conv == head else dense).append(group)
        return [heads[0], *dense, *heads[1:]]


def _densenet40(depth: int = 40, growth: int = 12, **kw: object) -> CifarDenseNet:
    return CifarDenseNet(depth=depth, growth=growth, **kw)  # type: ignore[arg-type]


register_model("densenet40")(_densenet40)
