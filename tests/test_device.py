"""Device choices (``csgd_cli.common.device``)."""

from __future__ import annotations

import torch

from csgd_cli.common.device import use_channels_last


def test_channels_last_follows_the_config() -> None:
    """channels_last inputs only when the config asks, even on CUDA."""
    cuda = torch.device("cuda", 0)
    assert use_channels_last(True, cuda) and not use_channels_last(False, cuda)
    assert not use_channels_last(True, torch.device("cpu"))
