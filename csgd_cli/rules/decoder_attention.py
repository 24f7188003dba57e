"""Hugging Face decoder attention of the Llama family: whole key/value groups of heads.

``LlamaAttention`` and the classes whose forward is the same up to per-logit terms
(Mistral, Qwen2 and Gemma: sliding window; Qwen3: an RMSNorm over ``head_dim`` shared by
every head; Gemma2: logit softcapping) project ``q_proj``/``k_proj``/``v_proj``, view
them as ``(*tokens, -1, head_dim)`` (the head count is inferred), rotate channels ``i``
and ``i + head_dim / 2`` of each head together (rotary embeddings) and let query heads
``[h * n_rep, (h + 1) * n_rep)`` read key/value head ``h`` (``repeat_kv`` with
``num_key_value_groups = n_rep``; grouped-query attention when ``n_rep > 1``).

So a channel of the **kv group** (one group per attention, named after it) is key/value
head ``h`` with its ``n_rep`` query heads: ``head_dim`` rows of k and v, ``n_rep *
head_dim`` rows of q and input columns of ``o_proj`` (``Member.block``). Two kv groups
whose q, k, v weights and biases are identical give identical outputs head for head,
so the merge keeps one and sums the projection's column blocks (as the head groups of
``attention`` do, through the same members). ``head_dim``, ``num_key_value_groups`` and
``scaling`` do not change and the reshapes infer the head count, so nothing is refit;
the shared config keeps its (original) head counts, which the forward does not read
(the KV cache takes its shapes from the keys it is given).

Channels *within* a head stay: rotary embeddings pair channel ``i`` with ``i +
head_dim / 2`` and the forward views with ``self.head_dim``, so the head-channel group
is declared excluded with that reason, and the kv group (which yields to it) is the one
chosen. Only the classes named match: a subclass may change the forward. Fused
``qkv_proj`` attention (Phi-3) has no rule and stays excluded by the tracer.
"""

from __future__ import annotations

from torch import nn

from .attention import _attention_kind, _Heads, _no_resize, _no_tensors, head_channels
from .base import LayerRule, exact_class
from .groups import ChannelGroup, Member

_CLASSES = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}Attention"
    for m, c in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
        ("gemma", "Gemma"), ("gemma2", "Gemma2"),
    )
)  # fmt: skip

_ROTARY = (  # head_channels appends " in '<name>' (<class>)"
    "rotary embeddings pair channels i and i + head_dim/2 of every head (its whole kv "
    "groups prune instead)"
)


def _where(m: nn.Module) -> _Heads:
    d = m.head_dim
    heads, kv = m.q_proj.out_features // d, m.k_proj.out_features // d
    return _Heads("q_proj", "k_proj", "v_proj", "o_proj", (0, 0, 0), heads, kv, d, _ROTARY)


def kv_group(m: nn.Module, name: str, where: _Heads) -> ChannelGroup:
    """The group of whole kv groups of decoder attention ``m`` (named ``name``): channel
    ``h`` is key/value head ``h`` and the ``n_rep`` query heads that read it."""
    pre, d = f"{name}." if name else "", where.head_dim
    n_rep = where.heads // where.kv_heads
    members = [
        Member(pre + where.q, "out", block=n_rep * d),
        Member(pre + where.k, "out", block=d),
        Member(pre + where.v, "out", block=d),
        Member(pre + where.proj, "in", block=n_rep * d),
    ]
    why = None
    if where.heads != n_rep * where.kv_heads or getattr(m, "num_key_value_groups", n_rep) != n_rep:
        why = (
            f"its {where.heads} query heads do not read its {where.kv_heads} key/value heads "
            f"in groups of num_key_value_groups in '{name}' ({type(m).__name__})"
        )
    return ChannelGroup(name or "heads", where.kv_heads, members, why, yields_to=pre + where.q)


def _groups(m: nn.Module, name: str) -> list[ChannelGroup]:
    where = _where(m)
    return [head_channels(m, name, where), kv_group(m, name, where)]


DECODER_RULES: list[LayerRule] = [
    LayerRule(
        "transformers decoder attention", exact_class(*_CLASSES), _attention_kind, _no_tensors,
        _no_resize, groups=_groups,
    ),
]  # fmt: skip
