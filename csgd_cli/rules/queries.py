"""Questions other floors ask about a layer, answered by its rule in the one table
(``layers.RULES``): nothing outside ``rules/`` and ``models/`` tests a torch layer class."""

from __future__ import annotations

from torch import nn

from .layers import is_depthwise, rule_for


def weighted(m: nn.Module) -> bool:
    """Its multiply-adds are its weight's size x output positions (convs, linear)."""
    r = rule_for(m)
    return r is not None and r.weighted


def scored_by(m: nn.Module) -> str | None:
    """Torch-Pruning's function for ``m``'s output channels (what a criterion scores)."""
    r = rule_for(m)
    return None if r is None else r.scored_by


def channel_dim(m: nn.Module) -> int | None:
    """For a producer (a layer writing channels of its own: conv, linear): the dim it
    writes them in and reads its input's, 1 (NCHW) or -1 (the last); else None."""
    r = rule_for(m)
    return None if r is None else r.channel_dim


def channels_last(m: nn.Module) -> bool:
    """A producer that writes its channels in the last dim (a linear layer, token-wise)."""
    return channel_dim(m) == -1


def out_width(m: nn.Module) -> int:
    """A producer's number of output channels (its ``out`` kernel's size, times its
    groups where they split that dim, as a transposed conv's do)."""
    name, dim, _ = rule_for(m).tensors(m, "out")[0]  # type: ignore[union-attr]
    n = int(getattr(m, name).shape[dim])
    return n * getattr(m, "groups", 1) if dim == 1 else n


def in_width(m: nn.Module) -> int:
    """A producer's number of input channels (its ``in`` kernel's size, times its
    groups where they split that dim, as a conv's do)."""
    name, dim, _ = rule_for(m).tensors(m, "in")[0]  # type: ignore[union-attr]
    n = int(getattr(m, name).shape[dim])
    return n * getattr(m, "groups", 1) if dim == 1 else n


def image_channels(m: nn.Module) -> int | None:
    """The channels of the images (N, C, H, W) a 2-D producer reads, else None."""
    r = rule_for(m)
    if r is None or r.channel_dim != 1 or getattr(m, r.tensors(m, "in")[0][0]).dim() != 4:
        return None
    return in_width(m)


def timed_conv(m: nn.Module) -> bool | None:
    """For a 2-d conv the latency model times: whether it is depthwise; else None."""
    if not (weighted(m) and isinstance(m, nn.Conv2d)):
        return None
    return is_depthwise(m)


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm (with or without a fused activation): Network Slimming's gammas."""
    r = rule_for(m)
    return r is not None and r.name in ("batchnorm", "batchnorm+act")


def plain_batchnorm2d(m: nn.Module) -> bool:
    """Exactly torch's BatchNorm2d (a subclass may compute otherwise): what a DDP job's
    global-batch BatchNorm (``runner.distributed.SyncBatchNorm2d``) can stand in for."""
    return type(m) is nn.BatchNorm2d and is_batchnorm(m)


def is_plain_conv(m: nn.Module) -> bool:
    """A plain (not weight-standardised, not transposed) conv: BN folds into it."""
    r = rule_for(m)
    return r is not None and r.name == "conv"


# The classes the weighted rules match, for a library that filters layers by class
# (Torch-Pruning's ``target_types``).
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
