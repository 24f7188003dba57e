"""CIFAR VGG (Simonyan & Zisserman, BN variant): conv3x3 + BN + ReLU, global avg pool,
then a ``Linear(last, 512) + ReLU + Linear(512, num_classes)`` classifier.

Built from an explicit width spec, one entry per conv in order (each conv is its own
group, named after its module, ``features.<idx>``), so a merged (thinner) network is the
same class with smaller widths. Max-pools that would shrink the map below 1x1 for the
given ``image_size`` become ``nn.Identity`` so small inputs (8x8 digits) work and the
module indices, hence the state_dict keys, do not depend on the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..rules.groups import ChannelGroup, producer, reader
from . import kaiming_init, register_model

# Comma-separated conv output widths; "M" is a 2x2 max-pool.
CONFIGS = {
    "vgg11": "64,M,128,M,256,256,M,512,512,M,512,512,M",
    "vgg13": "64,64,M,128,128,M,256,256,M,512,512,M,512,512,M",
    "vgg16": "64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M",
    "vgg19": "64,64,M,128,128,M,256,256,256,256,M,512,512,512,512,M,512,512,512,512,M",
}


def parse_config(spec: str) -> list[int | str]:
    return [t if t == "M" else int(t) for t in spec.split(",")]


class CifarVGG(nn.Module):
    def __init__(
        self,
        config: str | Sequence[int | str] = CONFIGS["vgg16"],
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] | None = None,
        image_size: int = 32,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if isinstance(config, str):
            config = parse_config(config)
        n_conv = sum(1 for c in config if c != "M")
        if widths is None:
            widths = [int(c) for c in config if c != "M"]
        if len(widths) != n_conv:
            raise TypeError(f"widths needs {n_conv} entries (one per conv), got {len(widths)}")
        self.widths = [int(w) for w in widths]
        layers: list[nn.Module] = []
        self.conv_idx: list[int] = []  # index in ``features`` of every conv, in order
        cin, size, k = in_channels, int(image_size), 0
        for c in config:
            if c == "M":
                layers.append(nn.MaxPool2d(2) if size >= 2 else nn.Identity())
                size = size // 2 if size >= 2 else size
                continue
            self.conv_idx.append(len(layers))
            w = self.widths[k]
            layers += [
                nn.Conv2d(cin, w, 3, 1, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(True),
            ]
            cin, k = w, k + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(True), nn.Linear(hidden, num_classes)
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per conv, in order; each is read by the next conv (or the classifier)."""
        groups = []
        for k, i in enumerate(self.conv_idx):
            nxt = (
                f"features.{self.conv_idx[k + 1]}" if k + 1 < len(self.conv_idx) else "classifier.0"
            )
            groups.append(
                ChannelGroup(
                    f"features.{i}",
                    self.widths[k],
                    producer(f"features.{i}", f"features.{i + 1}") + reader(nxt),
                )
            )
        return groups


def _factory(config: str) -> Callable[..., CifarVGG]:
    def make(**kw: Any) -> CifarVGG:
        return CifarVGG(config=config, **kw)

    return make


for _name, _cfg in CONFIGS.items():
    register_model(_name)(_factory(_cfg))
