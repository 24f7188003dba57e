"""Rules for transformer layers: attention's head channels, LayerNorm, MultiheadAttention.

An attention module declares one group per module (``LayerRule.groups``), its **head
channels**: group channel ``i`` is channel ``i`` of every head's query, key and value and
the matching input column of the output projection. C-SGD pulls the q, k and v rows of a
cluster together in every head, and then the merge is exact:

- identical value channels carry the same output, so the projection's columns of the
  cluster are summed into the kept one (an ``in`` member, as for any reader);
- identical query channels ``i, j`` with identical key channels give
  ``q_i k_i + q_j k_j = 2 q_i k_i``: the kept key row is sliced and the kept query row is
  the *sum* of the cluster's query rows (``Member.summed``), so the attention logits,
  and the softmax, are unchanged.

The softmax scale ``head_dim ** -0.5`` is a constant of the original width: the merged
module keeps its ``scale`` (``scaling``) and runs the attention with it explicitly
(timm's fused path would use the new width's scale, so it is turned off). Every head
keeps the same width, so the module's reshapes into heads stay valid; ``refit`` sets
``head_dim`` from the merged layers. Keys and values shared by several query heads (GQA)
are members once per kv head. Per-head parameters (Swin's relative position bias table)
do not depend on the head's width and stay as they are.

**Heads** are a second group per module (named after the attention module), whose
channels are whole heads: a head is ``head_dim`` rows of q, k and v and ``head_dim``
input columns of the projection (``Member.block``), and its per-head parameters (Swin's
relative position bias table: one column per head, inside the softmax, so pulled
together like q, k and v). Two heads with identical q, k, v and per-head parameters
give identical outputs, so the merge keeps one and sums the projection's column blocks;
``num_heads`` (``num_attention_heads``) follows, the scale stays. The head group and the
head-channel group share rows, so one is pruned at a time: the head group ``yields_to``
the head channels (``select_groups`` leaves it out when both match); exclude the channel
group (``prune.exclude=['*.qkv']``, BERT: ``'*.self.query'``) to prune heads. A head
count is not in the tensors' shapes: ``fit_to_state_dict`` sets it from the merged
widths (``set_head_counts``). Query heads that share key/value heads (GQA) keep their
head group excluded: merging some would leave the kv groups uneven.

Which attention forward passes are exact is a property of the class, so rules match
classes by name (timm's ``Attention`` and Swin's ``WindowAttention``, transformers'
BERT- and ViT-style attention); anything inside an attention that mixes the channels of
a head (qk-norm, rotary embeddings, a norm before the projection, a gate) excludes the
group with its reason. ``nn.MultiheadAttention`` ties the heads' width to its input's
(``embed_dim``), so its head channels cannot shrink inside the class: excluded, said.

LayerNorm (and RMSNorm) normalise over the channels, so two merged channels would change
their mean and variance: a group through one is excluded with that reason (in a
transformer that is the residual stream; MLP hidden units and head channels prune).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .base import LayerRule, StateDict, TensorSpec, exact_class, subclass_of
from .groups import ChannelGroup, Member


def _no_tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
    del m, kind
    return []


def _no_resize(m: nn.Module, sd: StateDict, p: str) -> None:
    del m, sd, p


# -- norms over the channels -------------------------------------------------------------
_is_norm = subclass_of(
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.normalization.RMSNorm",
    "timm.layers.norm.RmsNorm", "timm.layers.norm.SimpleNorm",
)  # fmt: skip


def _norm_kind(m: nn.Module, out: bool) -> str:
    del out
    return (
        f"{type(m).__name__} {{layer}} normalises over the channels (merging two changes "
        "their mean and variance; in a transformer: the residual stream)"
    )


# -- attention ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Heads:
    """Where an attention's heads sit: projection layers (relative names; ``q``, ``k``,
    ``v`` may be one fused layer at row offsets), heads, kv heads, width of a head."""

    q: str
    k: str
    v: str
    proj: str
    offsets: tuple[int, int, int]
    heads: int
    kv_heads: int
    head_dim: int
    why: str | None = None  # what in the forward pass mixes a head's channels
    per_head: tuple[tuple[str, int], ...] = ()  # the module's own (tensor, head dimension)


def _identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _timm_heads(m: nn.Module) -> _Heads:
    p = m.qkv.out_features // 3
    why = None
    if not (_identity(getattr(m, "q_norm", None)) and _identity(getattr(m, "k_norm", None))):
        why = "qk-norm normalises over each head's channels"
    elif not _identity(getattr(m, "norm", None)):
        why = "a norm over the attention's output channels"
    elif getattr(m, "gate", None) is not None:
        why = "a gate on the attention's output channels"
    table = getattr(m, "relative_position_bias_table", None)  # Swin: one column per head
    per_head = (("relative_position_bias_table", 1),) if table is not None else ()
    return _Heads("qkv", "qkv", "qkv", "proj", (0, p, 2 * p), m.num_heads, m.num_heads,
                  p // m.num_heads, why, per_head)  # fmt: skip


def _hf_heads(m: nn.Module) -> _Heads:
    if hasattr(m, "q_proj"):  # transformers 5 (ViT): the projections on one module
        q, k, v, o, own = "q_proj", "k_proj", "v_proj", "o_proj", m
    else:  # BERT: ``self`` holds query/key/value, ``output.dense`` projects
        q, k, v, o, own = "self.query", "self.key", "self.value", "output.dense", m.self
    heads = getattr(own, "num_attention_heads", None) or own.config.num_attention_heads
    kv = getattr(own.config, "num_key_value_heads", None) or heads
    width = m.get_submodule(q).out_features // heads
    why = None
    if getattr(own.config, "position_embedding_type", "absolute") != "absolute":
        why = "relative position embeddings inside the attention"
    return _Heads(q, k, v, o, (0, 0, 0), heads, kv, width, why)


def head_channels(m: nn.Module, name: str, where: _Heads, why: str | None = None) -> ChannelGroup:
    """The head-channel group of attention ``m`` (named ``name``)."""
    pre = f"{name}." if name else ""
    h, d = where, where.head_dim
    qo, ko, vo = h.offsets
    members = [Member(pre + h.q, "out", qo + i * d, summed=True) for i in range(h.heads)]
    for i in range(h.kv_heads):
        members += [Member(pre + h.k, "out", ko + i * d), Member(pre + h.v, "out", vo + i * d)]
    members += [Member(pre + h.proj, "in", i * d) for i in range(h.heads)]
    reason = why or h.why
    if reason:
        reason = f"{reason} in '{name}' ({type(m).__name__})"
    return ChannelGroup(pre + h.q, d, members, reason)


def head_group(m: nn.Module, name: str, where: _Heads, why: str | None = None) -> ChannelGroup:
    """The group of whole heads of attention ``m`` (named ``name``): each channel is a
    head's q, k, v rows, its projection columns and its per-head parameters."""
    pre = f"{name}." if name else ""
    h, d = where, where.head_dim
    qo, ko, vo = h.offsets
    members = [Member(pre + h.q, "out", qo, block=d), Member(pre + h.k, "out", ko, block=d),
               Member(pre + h.v, "out", vo, block=d)]  # fmt: skip
    members += [Member(name, "channel") for _ in h.per_head[:1]]  # the module's own tensors
    members.append(Member(pre + h.proj, "in", block=d))
    reason = why or h.why
    if reason is None and h.kv_heads != h.heads:
        reason = "query heads share key/value heads (GQA): merging some leaves them uneven"
    if reason:
        reason = f"{reason} in '{name}' ({type(m).__name__})"
    return ChannelGroup(name or "heads", h.heads, members, reason, yields_to=pre + h.q)


def _refit_timm(m: nn.Module) -> None:
    table = getattr(m, "relative_position_bias_table", None)
    if table is not None:  # Swin: the heads are the table's columns
        m.num_heads = table.shape[1]
    width = m.qkv.out_features // 3 // m.num_heads
    if hasattr(m, "head_dim"):
        m.head_dim = width
    if hasattr(m, "attn_dim"):
        m.attn_dim = width * m.num_heads
    if round(m.scale**-2) != width:  # merged: the original scale, applied explicitly
        m.fused_attn = False


def _refit_hf(m: nn.Module) -> None:
    own = m if hasattr(m, "q_proj") else m.self
    q = m.q_proj if hasattr(m, "q_proj") else m.self.query
    heads = getattr(own, "num_attention_heads", None) or own.config.num_attention_heads
    width = q.out_features // heads
    for attr in ("head_dim", "attention_head_size"):
        if hasattr(own, attr):
            setattr(own, attr, width)
    if hasattr(own, "all_head_size"):
        own.all_head_size = width * heads  # ``scaling`` stays: the original width's


def _attention_kind(m: nn.Module, out: bool) -> str:
    del out
    return f"attention {{layer}} ({type(m).__name__}) is a member only through its layers"


def _mha_group(m: nn.Module, name: str) -> list[ChannelGroup]:
    del m, name
    return []  # its projections are no layers of their own: the tracer excludes them


def _mha_kind(m: nn.Module, out: bool) -> str:
    del m, out
    return (
        "nn.MultiheadAttention {layer} ties its heads' width to its input's (embed_dim), so "
        "neither its head channels nor its heads can shrink inside the class"
    )


def _both(m: nn.Module, name: str, where: _Heads) -> list[ChannelGroup]:
    return [head_channels(m, name, where), head_group(m, name, where)]


def _attention_rule(
    name: str, match: Callable[[nn.Module], bool], heads: Callable[[nn.Module], _Heads],
    refit: Callable[[nn.Module], None],
) -> LayerRule:  # fmt: skip
    def tensors(m: nn.Module, kind: str) -> list[TensorSpec]:
        # the per-head parameters: a ``channel`` member of its head group (inside the
        # softmax, so pulled together and sliced like q and k)
        return [(t, dim, "kernel") for t, dim in heads(m).per_head] if kind == "channel" else []

    return LayerRule(
        name, match, _attention_kind, tensors, _no_resize,
        groups=lambda m, n: _both(m, n, heads(m)), refit=refit,
    )  # fmt: skip


_TIMM = ("timm.layers.attention.Attention", "timm.models.swin_transformer.WindowAttention")
_HF = (
    "transformers.models.bert.modeling_bert.BertAttention",
    "transformers.models.roberta.modeling_roberta.RobertaAttention",
    "transformers.models.vit.modeling_vit.ViTAttention",
    "transformers.models.deit.modeling_deit.DeiTAttention",
)


ATTENTION_RULES: list[LayerRule] = [
    _attention_rule("timm attention", exact_class(*_TIMM), _timm_heads, _refit_timm),
    _attention_rule("transformers attention", exact_class(*_HF), _hf_heads, _refit_hf),
    LayerRule(
        "multihead attention", lambda m: isinstance(m, nn.MultiheadAttention), _mha_kind,
        _no_tensors, _no_resize, groups=_mha_group,
    ),
    LayerRule("layernorm", _is_norm, _norm_kind, _no_tensors, _no_resize),
]  # fmt: skip

_is_timm, _is_hf = exact_class(*_TIMM), exact_class(*_HF)


def set_head_counts(model: nn.Module, widths: dict[str, int]) -> None:
    """Give each attention whose head group is in ``widths`` that many heads (before
    ``refit``: the head width follows from the layers' sizes and the head count)."""
    for name, heads in widths.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue  # a group named after a layer elsewhere, or one not of this model
        if _is_timm(m):
            m.num_heads = heads
        elif _is_hf(m):
            (m if hasattr(m, "q_proj") else m.self).num_attention_heads = heads


def heads_merged(groups: Sequence[ChannelGroup], widths: dict[str, int]) -> int:
    """Attention heads a merge to ``widths`` (group -> width) removes, over every head
    group (``group.yields_to`` set) in ``groups``."""
    return sum(g.width - widths.get(g.name, g.width) for g in groups if g.yields_to)
