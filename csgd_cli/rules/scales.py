"""Layer scales: a learned per-channel factor, ``x * gamma`` (timm's ``LayerScale`` over
tokens or NHWC maps, ``LayerScale2d`` over NCHW maps, MetaFormer's ``Scale``).

Each channel is multiplied by its own factor, so the module is a ``channel`` member of its
group, as a BatchNorm's affine is: C-SGD pulls a cluster's factors together and the merge
keeps one per cluster. Without a rule the trace saw a view of the factor (``LayerScale2d``
runs ``gamma.view(1, -1, 1, 1)``) or a loose parameter and excluded the group, a
residual stream of EfficientFormer or PoolFormer among them.

Only the classes named match (not subclasses: a subclass may change the forward).
"""

from __future__ import annotations

from torch import nn

from .base import LayerRule, StateDict, TensorSpec, exact_class


def _factor(m: nn.Module) -> str:
    return "scale" if isinstance(getattr(m, "scale", None), nn.Parameter) else "gamma"


def _kind(m: nn.Module, out: bool) -> str:
    del out
    if getattr(m, _factor(m)).numel() <= 1:
        return "layer scale {layer} has one factor for every channel"
    return "channel"


def _tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    del kind
    return [(_factor(m), 0, "affine")]


def _resize(m: nn.Module, sd: StateDict, p: str) -> None:
    """MetaFormer's ``Scale`` keeps the factor's view shape; the others only the tensor."""
    if isinstance(getattr(m, "shape", None), tuple):
        n = sd[p + _factor(m)].shape[0]
        m.shape = (n, *m.shape[1:])


_TIMM = (
    "timm.layers.layer_scale.LayerScale",
    "timm.layers.layer_scale.LayerScale2d",
    "timm.models.metaformer.Scale",
    "timm.models.fastvit.LayerScale2d",
)
SCALE_RULES: list[LayerRule] = [
    LayerRule(
        "layer scale", exact_class(*_TIMM), _kind, _tensors, _resize,
        frozenset({"MulBackward", "ViewBackward"}),
    ),
]  # fmt: skip
