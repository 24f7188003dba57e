"""Whole attention heads as clusterable units: a head group's channel is a head (its q, k,
v rows, its projection columns, its per-head parameters: ``Member.block``). Two heads
with identical q, k, v and per-head parameters merge exactly into one, with the
projection's column blocks summed: timm's fused qkv, transformers' BERT and ViT, Swin's
windowed attention with its bias table; GQA and nn.MultiheadAttention are excluded with
their reasons; heads and head channels of one attention are pruned one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from csgd_cli.api.pruner import CSGD, load_model, save
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.core.surgery import merge_checked
from csgd_cli.rules.attention import head_group, heads_merged
from csgd_cli.rules.groups import ChannelGroup, check_clusters, describe, select_groups
from csgd_cli.rules.layers import segment_rows
from csgd_cli.tracing.trace import channel_groups
from tests.test_attention import GQA, TINY_TRANSFORMER, VIT_RUN, _randomise, tiny_bert

timm = pytest.importorskip("timm")


def _collapse(model: nn.Module, groups: list[ChannelGroup], clusters: dict) -> None:
    """Every cluster's members made identical in every row the optimizer pulls: a head's
    whole q, k, v row blocks, biases and bias-table column (what converged C-SGD gives)."""
    with torch.no_grad():
        for g in groups:
            for a, b, blocks in segment_rows(model, g, ("kernel", "affine")):
                first = list(range(b - a))
                for c in clusters[g.name]:
                    for i in c:
                        first[i - a] = c[0] - a
                for r in blocks:
                    r.put(r.rows()[torch.tensor(first)])


def _heads_merged(model: nn.Module, x: object, exclude: list[str]) -> tuple[nn.Module, list]:
    """Prune heads (the head channels excluded), collapse, merge: outputs unchanged."""
    groups = channel_groups(model, x)
    chosen = select_groups(groups, ["*"], exclude)
    assert any(g.yields_to for g in chosen)
    clusters = cluster_groups(model, chosen, target_widths(chosen, 0.5), "kmeans", 0)
    _collapse(model, chosen, clusters)
    assert chi_report(model, chosen, clusters)["chi"] == 0.0
    pruner = CSGD(model, x, clusters=clusters)
    thin = pruner.merge(x, tolerance=1e-9).eval()  # the API's: it records the widths
    with torch.no_grad():
        a, b = _logits(model(x)), _logits(thin(x))
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    assert heads_merged(groups, {k: len(v) for k, v in clusters.items()}) > 0
    return thin, chosen


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_heads=4,
                             num_classes=10)  # fmt: skip


def test_timm_fused_qkv_heads_merge_exactly_and_reload(tmp_path: Path) -> None:
    model = _randomise(_vit())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    groups = channel_groups(model, x)
    heads = next(g for g in groups if g.name == "blocks.0.attn")
    assert heads.excluded is None and heads.width == 4 and heads.yields_to == "blocks.0.attn.qkv"
    assert {m.block for m in heads.members} == {48}  # a head: head_dim rows / columns
    scale = model.blocks[0].attn.scale
    thin, _ = _heads_merged(model, x, ["*.qkv"])
    attn = thin.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 48 and attn.qkv.out_features == 3 * 96
    assert attn.proj.in_features == 96 and attn.scale == scale
    path = save(thin, tmp_path / "vit.pt")
    again = load_model(path, model=_vit()).double()  # 4 heads of 48 -> 2 heads of 48
    assert again.blocks[0].attn.num_heads == 2 and again.blocks[0].attn.head_dim == 48
    with torch.no_grad():
        assert torch.allclose(again(x), thin(x), rtol=0, atol=1e-12)


def test_transformers_bert_and_vit_heads_merge_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    bert, ids = tiny_bert()
    thin, chosen = _heads_merged(_randomise(bert), ids, ["*.self.query"])
    assert "bert.encoder.layer.0.attention" in {g.name for g in chosen}
    own = thin.bert.encoder.layer[0].attention.self
    assert own.num_attention_heads == 2 and own.attention_head_size == 8
    assert own.all_head_size == 16 and own.scaling == 8**-0.5
    assert thin.config.num_attention_heads == 4  # the shared config is not the layer's
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **TINY_TRANSFORMER)
    )
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    thin, _ = _heads_merged(_randomise(vit), x, ["*.q_proj"])
    attn = thin.vit.layers[1].attention
    assert attn.num_attention_heads == 2 and attn.head_dim == 8 and attn.o_proj.in_features == 16


def _swin() -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
        embed_dim=32, depths=(1, 1), num_heads=(2, 4), num_classes=10,
    )  # fmt: skip


def test_swin_heads_merge_with_their_bias_table_columns() -> None:
    model = _randomise(_swin())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = channel_groups(model, x)
    heads = next(g for g in groups if g.name == "layers.1.blocks.0.attn")
    own = [m for m in heads.members if m.module == "layers.1.blocks.0.attn"]
    assert heads.width == 4 and [m.kind for m in own] == ["channel"]  # the bias table
    table = model.layers[1].blocks[0].attn.relative_position_bias_table
    with torch.no_grad():  # heads 0 and 1 alike in q, k, v but not in their bias: apart
        groups2 = [heads]
        clusters = {heads.name: [[0, 1], [2], [3]]}
        _collapse(model, groups2, clusters)
        table[:, 1].add_(1.0)
    assert chi_report(model, groups2, clusters)["chi"] > 0  # the table is pulled too
    thin, _ = _heads_merged(model, x, ["*.qkv"])
    attn = thin.layers[1].blocks[0].attn
    assert attn.num_heads == 2 and attn.relative_position_bias_table.shape[1] == 2
    assert attn.qkv.out_features == 3 * 2 * 16  # heads 4 -> 2, head_dim stays 16


def test_gqa_and_multihead_attention_heads_are_excluded_with_reasons() -> None:
    model = GQA()
    g = head_group(model, "", model.where)
    assert g.excluded is not None and "share key/value heads (GQA)" in g.excluded

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))

    groups = channel_groups(_randomise(Net()), torch.randn(2, 5, 6, dtype=torch.float64))
    assert not any(g.yields_to for g in groups)  # no head group: the class ties its heads
    why = " ".join(g.excluded or "" for g in groups)
    assert "neither its head channels nor its heads can shrink" in why


def test_a_head_groups_cost_counts_whole_heads() -> None:
    from csgd_cli.targets.costs import Shapes

    model = _vit()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    shapes = Shapes(model, groups, {"blocks.0.attn"})
    ks = {"blocks.0.attn": 2}  # 4 heads of 48 -> 2
    assert shapes.shape("blocks.0.attn.qkv.weight", ks) == [3 * 96, 192]
    assert shapes.shape("blocks.0.attn.proj.weight", ks) == [192, 96]
    shapes = Shapes(model, groups, {"blocks.0.attn.qkv"})  # head channels: 48 -> 24 in all 12
    assert shapes.shape("blocks.0.attn.qkv.weight", {"blocks.0.attn.qkv": 24}) == [3 * 96, 192]


def test_heads_and_head_channels_are_pruned_one_at_a_time() -> None:
    model = _randomise(_vit())
    groups = channel_groups(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    names = [g.name for g in select_groups(groups, ["*"])]
    assert "blocks.0.attn.qkv" in names and "blocks.0.attn" not in names  # heads yield
    names = [g.name for g in select_groups(groups, ["blocks.0.attn*"], ["*.qkv"])]
    assert names == ["blocks.0.attn"]
    said = "blocks.0.attn  width 4  prunable when 'blocks.0.attn.qkv' is excluded"
    assert said in describe(groups)  # what `csgd groups` prints
    clusters = {"blocks.0.attn": [[0, 1], [2], [3]], "blocks.0.attn.qkv": [[0, 1]]
                + [[i] for i in range(2, 48)]}  # fmt: skip
    with pytest.raises(CsgdError, match="share rows and cannot both be pruned"):
        check_clusters(groups, clusters)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    y = torch.arange(x.shape[0]) % 4
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adamw_wrapped_collapses_heads_and_merges_exactly() -> None:
    model = _randomise(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8,
                                         depth=1, embed_dim=24, num_heads=4,
                                         num_classes=4))  # fmt: skip
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    pruner = CSGD(model, x[:2], ratio=0.5, exclude=["*.qkv"], clustering="kmeans")
    assert len(pruner.clusters["blocks.0.attn"]) == 2
    start = chi_report(model, pruner.groups, pruner.clusters)["groups"]["blocks.0.attn"]["chi"]
    opt = pruner.wrap(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05),
                      epsilon=40.0, norm_epsilon=40.0)  # fmt: skip
    _train(model, opt, x, 40)  # differences shrink x(1 - 0.01 * (40 + 0.05)) a step
    end = pruner.chi_report()["groups"]["blocks.0.attn"]["chi"]
    assert end < 1e-10 * start
    thin = pruner.merge(x, tolerance=1e-4)
    rep = pruner.merge_report
    assert rep["relative_logit_diff"] <= 1e-4 and rep["top1_agreement"] == 1.0
    assert rep["heads_merged"] == 2 and thin.blocks[0].attn.num_heads == 2


def test_centripetal_sgd_collapses_swin_heads_bias_table_included() -> None:
    model = _randomise(_swin())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    groups = channel_groups(model, x)
    chosen = select_groups(groups, ["layers.1.blocks.0.attn"])
    clusters = cluster_groups(model, chosen, {"layers.1.blocks.0.attn": 2}, "even", 0)
    pruner = CSGD(model, x[:2], clusters=clusters)
    opt = pruner.optimizer(lr=0.02, epsilon=30.0, norm_epsilon=30.0, momentum=0.0,
                           nesterov=False)  # fmt: skip
    table = model.layers[1].blocks[0].attn.relative_position_bias_table
    _train(model, opt, x, 60)  # differences x(1 - 0.02 * 30) a step
    assert (table[:, 0] - table[:, 1]).abs().max() < 1e-12
    thin, rep = merge_checked(model, groups, pruner.clusters, x, tolerance=1e-4)
    assert rep["heads_merged"] == 2 and rep["top1_agreement"] == 1.0
    assert thin.layers[1].blocks[0].attn.relative_position_bias_table.shape[1] == 2


def test_csgd_run_prunes_vit_heads_end_to_end_and_reloads(tmp_path: Path) -> None:
    from csgd_cli.runner import cli

    run = tmp_path / "run"
    cli.main([*VIT_RUN, "prune.exclude=[*.qkv]", "pretrain.epochs=1", f"hydra.run.dir={run}"])
    thin = load_model(run / "pruned.pt")  # rebuilt from the registry: 3 heads -> 2
    attn = thin.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 64 and attn.qkv.out_features == 3 * 128
    with torch.no_grad():
        assert thin(torch.randn(1, 3, 32, 32)).shape == (1, thin.head.out_features)


def test_heads_then_head_channels_in_a_second_round_merge_exactly_and_reload(
    tmp_path: Path,
) -> None:
    """Both prune one after the other: heads first, then the kept heads' channels."""
    model = _randomise(_vit())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    first, _ = _heads_merged(model, x, ["*.qkv"])  # 4 heads of 48 -> 2 heads of 48
    groups = channel_groups(first, x)
    chosen = select_groups(groups, ["*.qkv"])  # round 2: the head channels, 48 -> 24
    clusters = cluster_groups(first, chosen, target_widths(chosen, 0.5), "kmeans", 0)
    _collapse(first, chosen, clusters)
    second = CSGD(first, x, clusters=clusters).merge(x, tolerance=1e-9).eval()
    with torch.no_grad():  # against the collapsed round-1 network
        a, b = first.eval()(x), second(x)
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    attn = second.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features) == (2, 24, 3 * 48)
    again = load_model(save(second, tmp_path / "vit.pt"), model=_vit()).double()
    assert (again.blocks[0].attn.num_heads, again.blocks[0].attn.head_dim) == (2, 24)
    with torch.no_grad():
        assert torch.allclose(again(x), b, rtol=0, atol=1e-12)
