"""Hugging Face decoder attention of the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma2; rotary embeddings, grouped-query attention): whole kv groups prune and merge
exactly. A group channel is key/value head h with the n_rep query heads that read it;
C-SGD (the public optimizer, one step at lr x epsilon = 1 on a zero-gradient loss)
collapses the clusters, the merge keeps the logits, the thin attention has fewer heads
and generation with the KV cache gives the same tokens. Channels within a head stay
excluded (rotary pairs), a subclass of LlamaAttention is refused, and the cost model
counts whole kv groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from csgd_cli.api.pruner import CSGD, load_model, save
from csgd_cli.rules.groups import select_groups
from csgd_cli.tracing.trace import channel_groups

transformers = pytest.importorskip("transformers")

FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral", "Gemma", "Gemma2")


def _decoder(family: str, kv: int) -> nn.Module:
    """Two layers, hidden 32, 4 heads of 8 sharing ``kv`` key/value heads; weights far
    from init (a wrong merge must show)."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    if family == "Qwen2":
        cfg.attention_bias = True  # q/k/v biases: pulled and merged with their rows
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.double().eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", [2, 4])
def test_kv_groups_collapse_and_merge_exactly_then_generate(
    family: str, kv: int, tmp_path: Path
) -> None:
    if not hasattr(transformers, f"{family}ForCausalLM"):
        pytest.skip(f"transformers has no {family}")
    model, ids = _decoder(family, kv), _ids()
    x = {"input_ids": ids}
    groups = {g.name: g for g in channel_groups(model, x)}
    attn = groups["model.layers.0.self_attn"]
    assert attn.excluded is None and attn.width == kv
    assert {(m.module.rsplit(".", 1)[1], m.block) for m in attn.members} == {
        ("q_proj", 8 * 4 // kv),
        ("k_proj", 8),
        ("v_proj", 8),
        ("o_proj", 8 * 4 // kv),
    }
    assert "rotary embeddings" in (groups["model.layers.0.self_attn.q_proj"].excluded or "")
    pruner = CSGD(model, x, ratio=0.5)
    assert "model.layers.1.self_attn" in pruner.clusters  # chosen: its head channels are not
    assert pruner.widths["model.layers.1.self_attn"] == kv // 2
    opt = pruner.optimizer(lr=0.5, epsilon=2.0, norm_epsilon=2.0, momentum=0.0,
                           weight_decay=0.0)  # fmt: skip
    model.train()
    loss = 0.0 * model(**x).logits.sum()  # zero gradient: only the centripetal pull moves
    opt.zero_grad()
    loss.backward()
    opt.step()  # lr x epsilon = 1: every cluster becomes its mean
    model.eval()
    thin = pruner.merge(x, tolerance=1e-5).eval()
    with torch.no_grad():
        a, b = model(**x).logits, thin(**x).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert pruner.merge_report["heads_merged"] == 2 * (kv - kv // 2)  # kv groups, 2 layers
    sa, n_rep = thin.model.layers[0].self_attn, 4 // kv
    kept = kv // 2
    assert sa.k_proj.out_features == sa.v_proj.out_features == kept * 8
    assert sa.q_proj.out_features == sa.o_proj.in_features == kept * n_rep * 8
    assert sa.num_key_value_groups == n_rep and sa.head_dim == 8
    gen = dict(max_new_tokens=3, do_sample=False, use_cache=True)
    with torch.no_grad():
        want, got = model.generate(ids, **gen), thin.generate(ids, **gen)
    assert got.shape == (2, 10) and torch.equal(got, want)
    if family == "Llama":  # the head count is in the layers' shapes: a plain reload
        again = load_model(save(thin, tmp_path / "thin.pt"), model=_decoder(family, kv))
        with torch.no_grad():
            assert torch.equal(again.double().eval()(**x).logits, b)


def test_a_subclass_of_llama_attention_stays_refused() -> None:
    from transformers.models.llama import modeling_llama

    class Mine(modeling_llama.LlamaAttention):  # may change the forward: no rule
        pass

    model = _decoder("Llama", 2)
    for layer in model.model.layers:
        old = layer.self_attn
        layer.self_attn = Mine(model.config, old.layer_idx).double()
        layer.self_attn.load_state_dict(old.state_dict())
    groups = channel_groups(model, {"input_ids": _ids()})
    names = {g.name for g in select_groups(groups, ["*"])}
    assert not any("self_attn" in n for n in names)  # the MLPs still prune
    assert any("mlp" in n for n in names)
    why = " ".join(g.excluded or "" for g in groups if "self_attn" in g.name)
    assert "Mine" in why


def test_the_cost_model_counts_whole_kv_groups() -> None:
    from csgd_cli.targets.costs import Shapes

    model = _decoder("Llama", 2)
    n = "model.layers.0.self_attn"
    shapes = Shapes(model, channel_groups(model, {"input_ids": _ids()}), {n})
    got = {t: shapes.shape(f"{n}.{t}.weight", {n: 1}) for t in ("q_proj", "k_proj", "o_proj")}
    assert got == {"q_proj": [16, 32], "k_proj": [8, 32], "o_proj": [32, 16]}  # 1 kv group kept
