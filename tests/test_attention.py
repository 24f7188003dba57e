"""Attention merges exactly: head channels of fused qkv (timm), separate q/k/v
(transformers' BERT and ViT), Swin's windowed attention with its per-head bias table and
shared key/value heads (GQA); nn.MultiheadAttention and LayerNorm are excluded with their
reasons; channels that patch embeddings and NHWC blocks move (``flatten(2).transpose``,
``permute``) are no longer excluded; a merged transformer reloads with ``load_model``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from csgd_cli.api.pruner import CSGD, load_model, save
from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, num_clusters, target_widths
from csgd_cli.rules.attention import _Heads, head_channels
from csgd_cli.rules.groups import ChannelGroup, select_groups
from csgd_cli.tracing.trace import channel_groups
from tests.test_any_cnn import collapse

timm = pytest.importorskip("timm")


def _randomise(model: nn.Module) -> nn.Module:
    """Weights far from init (zero biases, unit norms would hide a wrong merge)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.double().eval()


def _merged(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> tuple[nn.Module, list]:
    """Collapse every prunable group's clusters, merge; the outputs must not move."""
    groups = channel_groups(model, x)
    chosen = select_groups(groups, ["*"])  # head channels: the heads yield to them
    clusters = cluster_groups(model, chosen, target_widths(chosen, ratio), "even", 0)
    collapse(model, groups, clusters)
    assert chi_report(model, chosen, clusters)["chi"] == 0.0
    thin = CSGD(model, x, clusters=clusters).merge(x, tolerance=1e-9).eval()  # widths kept
    with torch.no_grad():
        a, b = _logits(model(x)), _logits(thin(x))
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    assert bool((a.argmax(-1) == b.argmax(-1)).all())
    return thin, chosen


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]


def _head_group(groups: list[ChannelGroup], name: str) -> ChannelGroup:
    return next(g for g in groups if g.name == name)


def test_timm_fused_qkv_head_channels_merge_exactly_and_reload(tmp_path: Path) -> None:
    model = _randomise(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2,
                                         num_classes=10))  # fmt: skip
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    groups = channel_groups(model, x)
    g = _head_group(groups, "blocks.0.attn.qkv")
    assert g.excluded is None and g.width == 64  # head_dim: channel i of all 3 heads
    assert sum(m.summed for m in g.members) == 3  # the query rows, one member per head
    scale = model.blocks[0].attn.scale
    thin, _ = _merged(model, x)
    attn = thin.blocks[0].attn
    assert attn.head_dim == 32 and attn.num_heads == 3 and attn.qkv.out_features == 3 * 96
    assert attn.scale == scale  # the original width's constant
    path = save(thin, tmp_path / "vit.pt")
    fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
    again = load_model(path, model=fresh).double()
    with torch.no_grad():
        assert torch.allclose(again(x), thin(x), rtol=0, atol=1e-12)
    assert again.blocks[1].attn.head_dim == 32


def test_swin_window_attention_with_its_bias_table_merges_exactly() -> None:
    model = _randomise(timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
        embed_dim=32, depths=(1, 1), num_heads=(2, 4), num_classes=10,
    ))  # fmt: skip
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    thin, chosen = _merged(model, x)
    names = {g.name for g in chosen}
    assert {"layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv"} <= names
    attn = thin.layers[1].blocks[0].attn
    assert attn.relative_position_bias_table.shape[1] == 4  # per head: heads are kept
    assert attn.qkv.out_features == 3 * 4 * 8  # head_dim 16 -> 8


def test_transformers_separate_qkv_bert_and_vit_merge_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    bert, ids = tiny_bert()
    thin, chosen = _merged(_randomise(bert), ids)
    assert "bert.encoder.layer.0.attention.self.query" in {g.name for g in chosen}
    own = thin.bert.encoder.layer[0].attention.self
    assert own.attention_head_size == 4 and own.query.out_features == 16
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **TINY_TRANSFORMER)
    )
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    thin, chosen = _merged(_randomise(vit), x)
    attn = thin.vit.layers[1].attention
    assert attn.head_dim == 4 and attn.scaling == 8**-0.5  # the scale of the original width


class GQA(nn.Module):
    """Two query heads share each key/value head (grouped-query attention)."""

    def __init__(self, dim: int = 12, heads: int = 4, kv: int = 2, hd: int = 6) -> None:
        super().__init__()
        self.heads, self.kv, self.scale = heads, kv, hd**-0.5
        self.q, self.k = nn.Linear(dim, heads * hd), nn.Linear(dim, kv * hd)
        self.v, self.o = nn.Linear(dim, kv * hd), nn.Linear(heads * hd, dim)
        self.head = nn.Linear(dim, 3)
        self.where = _Heads("q", "k", "v", "o", (0, 0, 0), heads, kv, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, -1).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, -1).transpose(1, 2)
        k = k.repeat_interleave(self.heads // self.kv, 1)
        v = v.repeat_interleave(self.heads // self.kv, 1)
        att = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.head(self.o((att @ v).transpose(1, 2).reshape(b, n, -1)).mean(1))

    def channel_groups(self) -> list[ChannelGroup]:
        return [head_channels(self, "", self.where)]


def test_shared_key_value_heads_gqa_merge_exactly() -> None:
    model = _randomise(GQA())
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    (g,) = model.channel_groups()
    assert g.width == 6 and [m.offset for m in g.members if m.module == "k"] == [0, 6]
    thin, _ = _merged(model, x)
    assert thin.q.out_features == 4 * 3 and thin.k.out_features == 2 * 3


def test_multihead_attention_is_excluded_with_its_reason_and_the_rest_merges() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc1, self.fc2, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            h = h + self.mha(h, h, h, need_weights=False)[0]
            return self.head((h + self.fc2(self.fc1(h).relu())).mean(1))

    model = _randomise(Net())
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    groups = channel_groups(model, x)
    embed = _head_group(groups, "embed")
    assert embed.excluded is not None and "nn.MultiheadAttention 'mha' ties" in embed.excluded
    thin, chosen = _merged(model, x)
    assert [g.name for g in chosen] == ["fc1"] and thin.fc1.out_features == 12


def test_layernorm_excludes_the_residual_stream_saying_so() -> None:
    model = _randomise(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1,
                                         num_classes=10, class_token=False, global_pool="avg",
                                         pos_embed="none"))  # fmt: skip
    groups = channel_groups(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    stream = _head_group(groups, "patch_embed.proj")
    assert stream.excluded is not None
    assert (
        "normalises over the channels" in stream.excluded and "residual stream" in stream.excluded
    )


class PatchNet(nn.Module):
    """A patch embedding into tokens (flatten(2).transpose(1, 2)) and an NHWC block
    (permute(0, 2, 3, 1), linear layers over the last dim, permute back)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.pw1, self.pw2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.conv = nn.Conv2d(12, 10, 3, padding=1)
        self.tok = nn.Linear(10, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).permute(0, 2, 3, 1)  # NHWC
        h = self.pw2(self.pw1(h).relu()).permute(0, 3, 1, 2)  # back to NCHW
        t = self.conv(h).flatten(2).transpose(1, 2)  # tokens (B, N, C)
        return self.head(self.tok(t).mean(1))


def test_patch_embeddings_and_nhwc_blocks_keep_channels_apart() -> None:
    model = _randomise(PatchNet())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = channel_groups(model, x)
    assert [(g.name, g.excluded) for g in groups] == [
        ("stem", None),
        ("pw1", None),
        ("pw2", None),
        ("conv", None),
        ("tok", None),
    ]
    thin, _ = _merged(model, x)
    assert (thin.stem.out_channels, thin.conv.out_channels, thin.tok.out_features) == (4, 5, 3)
    assert num_clusters(12, 0.5) == thin.pw2.out_features


def test_adamw_wrapped_pulls_attention_clusters_together_and_merges_exactly() -> None:
    """Transformers train with AdamW: ``wrap`` makes it C-SGD over the head channels."""
    model = _randomise(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8,
                                         depth=1, embed_dim=24, num_heads=2,
                                         num_classes=4))  # fmt: skip
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    pruner = CSGD(model, x[:2], ratio=0.5, clustering="even")
    assert "blocks.0.attn.qkv" in pruner.clusters
    opt = pruner.wrap(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05),
                      epsilon=40.0, norm_epsilon=40.0)  # fmt: skip
    model.train()
    for _ in range(40):  # the members' differences shrink x(1 - 0.01 * (40 + 0.05)) a step
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    thin = pruner.merge(x, tolerance=1e-6)
    assert thin.blocks[0].attn.head_dim == 6 and pruner.merge_report["top1_agreement"] == 1.0


TINY_TRANSFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
)


def tiny_bert() -> tuple[nn.Module, torch.Tensor]:
    """A two-layer BERT classifier (4 heads of 8) and a batch of token ids."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=50, max_position_embeddings=16, num_labels=3, **TINY_TRANSFORMER
    )
    return transformers.BertForSequenceClassification(cfg), torch.randint(0, 50, (3, 9))


VIT_RUN = (  # csgd run on a one-block ViT and a few synthetic images
    "run", "model=timm", "model.name=vit_tiny_patch16_224", "+model.kwargs.depth=1",
    "+model.kwargs.patch_size=8", "dataset=synthetic", "dataset.num_train=32",
    "dataset.num_test=16", "dataset.batch_size=16", "device=cpu", "eval.latency_iters=1",
    "eval.latency_batch=4", "schedule.epochs=1", "finetune.epochs=0", "prune.force=true",
    "prune.export=false", "clustering=even", "ratio=0.5",
)  # fmt: skip


def test_csgd_run_a_timm_vision_transformer_end_to_end(tmp_path: Path) -> None:
    from csgd_cli.runner import cli

    run = tmp_path / "run"
    cli.main([*VIT_RUN, f"hydra.run.dir={run}"])
    thin = load_model(run / "pruned.pt")
    attn = thin.blocks[0].attn
    assert type(thin).__name__ == "VisionTransformer" and attn.head_dim == 32
    assert attn.qkv.out_features == 3 * 3 * 32 and thin.blocks[0].mlp.fc1.out_features == 384
