"""One rule per layer kind: everything csgd knows about a layer, in one place.

A rule tells, for a module it matches (``isinstance``: subclasses included):

- ``kind(m, out)``: the member kind the module is in a group whose channels are its
  outputs (``out=True``) or its inputs: ``out``, ``channel`` or ``in``; or a string, the
  reason its channels cannot be merged exactly (the tracer then excludes the group);
- ``tensors(m, kind)``: which of its tensors a member of that kind touches, along which
  dimension, and whether they are kernels, affine parameters or buffers (what the
  optimizer pulls together, chi measures, k-means reads and the merge slices or sums);
- ``resize(m, sd, prefix)``: how to give a fresh module the merged tensors' shape;
- ``own_ops``: autograd ops the layer's forward runs besides per-channel ones (timm's
  BatchNormAct2d: ``batch_norm``, then the act): accepted inside the layer only.

``splits.SPLIT_RULES``: modules whose forward splits their channels (sizes kept as
attributes, recomputed by ``fit_to_state_dict`` after a merge; or a chunk in equal
pieces). Any other split or slice of the channels excludes its group.

The tracer accepts a layer only through its rule, and the merge resizes it only through
the same rule, so a layer that trains is a layer that merges (``tests/test_layers.py``
checks every rule). A module no rule matches has no per-channel merge rule: a group that
touches it is excluded at trace time with that reason, never refused after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..common.errors import CsgdError
from .attention import ATTENTION_RULES, set_head_counts
from .base import LayerRule, Role, StateDict, TensorSpec, subclass_of, with_versions
from .base import with_bias as _with_bias
from .decoder_attention import DECODER_RULES
from .groups import ChannelGroup, Kind
from .rows import RowBlock
from .scales import SCALE_RULES
from .splits import split_rule_for

# -- convolutions ------------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one filter per input channel (every channel computed on its own)."""
    return isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels > 1


def _conv_kind(m: nn.Module, out: bool) -> str:
    if is_depthwise(m):
        return "channel"
    if m.groups != 1:
        side = "output" if out else "input"
        return f"{side} of grouped conv {{layer}} (groups={m.groups})"
    return "out" if out else "in"


def _conv_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    if kind == "in":
        return [("weight", 1, "kernel")]
    return _with_bias(m, ("weight", 0, "kernel"))


def _conv_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    w = sd[p + "weight"]
    depthwise = is_depthwise(m)
    m.out_channels = w.shape[0]
    m.groups = w.shape[0] if depthwise else m.groups
    m.in_channels = w.shape[1] * m.groups


# transposed convs: weight (in, out / groups, *k): output channels are dim 1, inputs dim 0
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _tconv_kind(m: nn.Module, out: bool) -> str:
    if m.groups != 1:
        return f"{'output' if out else 'input'} of grouped transposed conv {{layer}}"
    return "out" if out else "in"


def _tconv_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    m.in_channels, m.out_channels = sd[p + "weight"].shape[:2]


# timm's weight-standardised convs: each filter is standardised over its own fan-in, so
# output rows slice exactly, but summing input columns changes every filter's statistics
_is_std_conv = subclass_of(
    *(f"timm.layers.std_conv.{c}" for c in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d"))
)


def _std_conv_kind(m: nn.Module, out: bool) -> str:
    kind = _conv_kind(m, out)
    why = "input of weight-standardised conv {layer} (summing inputs changes the standardisation)"
    return why if kind == "in" else kind


def _std_conv_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    gain = isinstance(getattr(m, "gain", None), nn.Parameter) and kind != "in"
    return _conv_tensors(m, kind) + ([("gain", 0, "affine")] if gain else [])


# -- linear layers -----------------------------------------------------------------------
def _linear_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    if kind == "in":
        return [("weight", 1, "kernel")]
    return _with_bias(m, ("weight", 0, "kernel"))


def _linear_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    m.out_features, m.in_features = sd[p + "weight"].shape


# -- per-channel layers ------------------------------------------------------------------
def _per_channel(m: nn.Module, out: bool) -> str:
    del m, out
    return "channel"


def _norm_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    del kind
    specs: list[TensorSpec] = []
    if getattr(m, "weight", None) is not None:
        role: Role = "affine" if isinstance(m.weight, nn.Parameter) else "buffer"
        specs += [("weight", 0, role), ("bias", 0, role)]
    if getattr(m, "running_mean", None) is not None:
        specs += [("running_mean", 0, "buffer"), ("running_var", 0, "buffer")]
    return specs


def _num_features_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    key = next(p + k for k in ("weight", "running_mean") if p + k in sd)
    m.num_features = sd[key].shape[0]


def _group_norm_kind(m: nn.Module, out: bool) -> str:
    del out
    if m.num_groups == m.num_channels:
        return "channel"
    return "GroupNorm {layer} has no per-channel merge rule"  # its groups mix channels


def _group_norm_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    m.num_groups = m.num_channels = sd[p + "weight"].shape[0]


def _prelu_kind(m: nn.Module, out: bool) -> str:
    del out
    return "channel" if m.num_parameters > 1 else "PReLU {layer} has one slope for every channel"


def _prelu_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    m.num_parameters = sd[p + "weight"].shape[0]


def _no_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    """Nothing but its tensors holds the width (they are replaced by ``fit_to_state_dict``)."""
    del m, sd, p


_NA = "timm.layers.norm_act."
_is_frozen_bn = subclass_of("torchvision.ops.misc.FrozenBatchNorm2d", _NA + "FrozenBatchNormAct2d")
_is_bn_act = subclass_of(_NA + "BatchNormAct2d", _NA + "SyncBatchNormAct")
_BN_OPS = frozenset({"NativeBatchNormBackward", "CudnnBatchNormBackward"})
_LINEAR_OPS = frozenset(  # F.linear over tokens or an NHWC map: a view, a matmul, a view
    "AddmmBackward MmBackward BmmBackward ViewBackward UnsafeViewBackward ReshapeAliasBackward"
    " ExpandBackward".split()
)

RULES: list[LayerRule] = [  # adding a layer kind is adding an entry (most specific first)
    *DECODER_RULES, *ATTENTION_RULES, *SCALE_RULES,  # attention, LayerNorm, MHA, layer scales
    LayerRule(
        "weight-standardised conv", _is_std_conv, _std_conv_kind, _std_conv_tensors,
        _conv_resize, frozenset({"ConvolutionBackward"}), weighted=True,
        scored_by="prune_conv_out_channels", channel_dim=1,
    ),
    LayerRule(
        "conv", lambda m: isinstance(m, _CONVS), _conv_kind, _conv_tensors, _conv_resize,
        frozenset({"ConvolutionBackward"}), weighted=True, scored_by="prune_conv_out_channels",
        channel_dim=1,
    ),
    LayerRule(  # its multiply-adds scale with input positions: cost not modelled here
        "transposed conv", lambda m: isinstance(m, _TCONVS), _tconv_kind,
        lambda m, k: [("weight", 0, "kernel")] if k == "in" else _with_bias(m, ("weight", 1, "kernel")),
        _tconv_resize, frozenset({"ConvolutionBackward"}), channel_dim=1,
    ),
    LayerRule(
        "linear", lambda m: isinstance(m, nn.Linear), lambda m, o: "out" if o else "in",
        _linear_tensors, _linear_resize, _LINEAR_OPS, weighted=True,
        scored_by="prune_linear_out_channels", channel_dim=-1,
    ),
    # BatchNorm + activation in one module (timm): its batch_norm op runs before the act
    LayerRule(
        "batchnorm+act", _is_bn_act, _per_channel, _norm_tensors, _num_features_resize, _BN_OPS,
        scored_by="prune_batchnorm_out_channels",
    ),
    LayerRule(
        "batchnorm", lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm), _per_channel,
        _norm_tensors, _num_features_resize, _BN_OPS, scored_by="prune_batchnorm_out_channels",
    ),
    LayerRule("frozen batchnorm", _is_frozen_bn, _per_channel, _norm_tensors, _no_resize),
    LayerRule(
        "instancenorm", lambda m: isinstance(m, nn.modules.instancenorm._InstanceNorm),
        _per_channel, _norm_tensors, _num_features_resize, _BN_OPS | {"ViewBackward"},
    ),
    LayerRule(
        "groupnorm", lambda m: isinstance(m, nn.GroupNorm), _group_norm_kind,
        lambda m, k: _with_bias(m, ("weight", 0, "affine")) if m.affine else [],
        _group_norm_resize, frozenset({"NativeGroupNormBackward"}),
    ),
    LayerRule(
        "prelu", lambda m: isinstance(m, nn.PReLU), _prelu_kind,
        lambda m, k: [("weight", 0, "affine")], _prelu_resize,
    ),
]  # fmt: skip
KINDS: tuple[Kind, ...] = ("out", "channel", "in")


def rule_for(m: nn.Module) -> LayerRule | None:
    """The first rule that matches ``m`` (order: most specific first), or None."""
    return next((r for r in RULES if r.match(m)), None)


def member_kind(m: nn.Module, out: bool, name: str = "") -> str:
    """The member kind of ``m`` in a group (its outputs: ``out``; else its inputs), or
    the reason it cannot be merged exactly (naming the layer ``name``)."""
    rule = rule_for(m)
    verdict = (
        rule.kind(m, out) if rule else f"{type(m).__name__} {{layer}} has no per-channel merge rule"
    )
    return verdict.replace("{layer}", f"'{name}'" if name else "").replace("  ", " ")


def member_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    """The tensors a member of ``kind`` touches; refuses a module its rule does not accept."""
    rule = rule_for(m)
    if rule is not None and rule.groups is not None:
        return rule.tensors(m, kind)  # a module declaring its groups: its own tensors
    verdict = member_kind(m, kind != "in") if rule is not None else None
    if rule is None or verdict != kind:
        why = verdict or f"{type(m).__name__} has no per-channel merge rule"
        raise CsgdError(f"{type(m).__name__} cannot be a '{kind}' member ({why})", "exclude it")
    return rule.tensors(m, kind)


# -- a group's rows: what the optimizer pulls together, chi measures, k-means reads ----------
def member_rows(model: nn.Module, group: ChannelGroup, roles: Sequence[Role]) -> list[RowBlock]:
    """Every centripetal row block of the group's ``out`` and ``channel`` members."""
    mods = dict(model.named_modules())
    out = []
    for m in group.of_kind("out", "channel"):
        mod = mods[m.module]
        first, end = m.span(group.width)
        for name, dim, role in member_tensors(mod, m.kind):
            if role in roles:
                t = getattr(mod, name)
                key = f"{m.module}.{name}" if m.module else name
                out.append(RowBlock(key, t, m.offset, first, end - first, role, m.block, dim))
    return out


def segment_rows(
    model: nn.Module, group: ChannelGroup, roles: Sequence[Role]
) -> list[tuple[int, int, list[RowBlock]]]:
    """Per segment ``(a, b)``: the row blocks of ``member_rows`` restricted to it, so
    every block covers the whole segment (segments are cut at every member's span)."""
    blocks = member_rows(model, group, roles)
    out = []
    for a, b in group.segments():
        part = [
            replace(r, row=r.row + (a - r.start) * r.block, start=a, n=b - a)
            for r in blocks
            if r.start <= a and b <= r.start + r.n
        ]
        out.append((a, b, part))
    return out


# -- giving a freshly built model a merged model's shapes ------------------------------------
def fit_to_state_dict(
    model: nn.Module, sd: StateDict, widths: dict[str, int] | None = None
) -> nn.Module:
    """Resize the layers of ``model`` to the tensors of ``sd`` (a thin model's) by their
    rules, then load them. A layer no rule matches must keep its shapes. ``widths``: the
    merged groups' widths (a head count is not in the tensors' shapes)."""
    set_head_counts(model, widths or {})
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        own = dict(m.named_parameters(recurse=False))
        own.update(m.named_buffers(recurse=False))
        changed = [k for k, v in own.items() if p + k in sd and sd[p + k].shape != v.shape]
        if not changed:
            continue
        rule = rule_for(m)
        if rule is None:
            raise CsgdError(
                f"layer '{name}' ({type(m).__name__}) changed shape but csgd cannot resize it",
                "the file does not belong to this network; pass the network it was pruned from",
            )
        rule.resize(m, sd, p)
        for k in changed:
            old = own[k]
            new = torch.empty(sd[p + k].shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                m.register_buffer(k, new)
    for m in model.modules():  # after their children: split sizes follow the new widths
        split, rule = split_rule_for(m), rule_for(m)
        if split is not None and split.refit is not None:
            split.refit(m)
        if rule is not None and rule.refit is not None:
            rule.refit(m)  # an attention's head width follows its merged layers
    model.load_state_dict(with_versions(sd, model.state_dict()))
    return model
