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


def timed_conv(m: nn.Module) -> bool | None:
    """For a 2-d conv the latency model times: whether it is depthwise; else None."""
    if not (weighted(m) and isinstance(m, nn.Conv2d)):
        return None
    return is_depthwise(m)


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm (with or without a fused activation): Network Slimming's gammas."""
    r = rule_for(m)
    return r is not None and r.name in ("batchnorm", "batchnorm+act")


def is_plain_conv(m: nn.Module) -> bool:
    """A plain (not weight-standardised, not transposed) conv: BN folds into it."""
    r = rule_for(m)
    return r is not None and r.name == "conv"


# The classes the weighted rules match, for a library that filters layers by class
# (Torch-Pruning's ``target_types``).
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
