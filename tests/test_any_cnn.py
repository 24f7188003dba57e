"""Any CNN: traced groups merge exactly (torchvision nets, ResNet-164, a custom net),
pruned traced models reload, and ResNet-50's paper FLOPs figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from csgd_cli.api.checkpoint import save_checkpoint
from csgd_cli.api.pruner import load_model
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, num_clusters, target_widths
from csgd_cli.core.surgery import merge
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup, prunable
from csgd_cli.rules.layers import segment_rows
from csgd_cli.tracing.trace import channel_groups, traced_groups

ROOT = Path(__file__).resolve().parents[1]


def collapse(model: nn.Module, groups: list[ChannelGroup], clusters: dict) -> None:
    """Make the members of every cluster identical in every centripetal tensor (what
    converged C-SGD produces), with non-trivial BN statistics so a wrong merge shows."""
    roles = ("kernel", "affine", "buffer")
    with torch.no_grad():
        for g in groups:
            if g.name not in clusters:
                continue
            for a, b, blocks in segment_rows(model, g, roles):
                for r in blocks:
                    if r.role != "kernel":
                        r.tensor.narrow(0, r.row, b - a).uniform_(0.5, 1.5)
                first = list(range(b - a))  # each channel -> its cluster's first member
                for c in clusters[g.name]:
                    if a <= c[0] < b:
                        for i in c:
                            first[i - a] = c[0] - a
                for r in blocks:
                    rows = r.tensor.narrow(0, r.row, b - a)
                    rows.copy_(rows[torch.tensor(first)])


def exact_merge(model: nn.Module, shape: tuple, ratio: float = 0.5, tmp=None) -> nn.Module:
    """Collapse clusters at ``ratio``, merge; logits equal to 1e-5 relative, top-1 all
    agree, widths follow the ratio on every prunable group (checked on a re-trace)."""
    torch.manual_seed(0)
    model = model.double().eval()
    groups = channel_groups(model)
    chosen = prunable(groups)
    clusters = cluster_groups(model, chosen, target_widths(chosen, ratio), "even", 0)
    collapse(model, groups, clusters)
    assert chi_report(model, chosen, clusters)["chi"] == 0.0
    thin = merge(model, groups, clusters).eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        a, b = model(x), thin(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert bool((a.argmax(1) == b.argmax(1)).all())
    want = {g.name: num_clusters(g.width, ratio) for g in chosen}
    got = {g.name: g.width for g in channel_groups(thin)}
    assert {k: got[k] for k in want} == want
    if tmp is not None:  # a pruned traced model rebuilds from its arch + group widths
        path = save_checkpoint(
            tmp / "pruned.pt", {"arch": thin.arch, "state_dict": thin.state_dict()}
        )
        named = thin.arch["kwargs"].get("target")  # model=custom: the user trusts it
        again = load_model(path, trust=(named,) if named else ()).double()
        with torch.no_grad():
            assert torch.equal(again(x), thin(x))
    return thin


@pytest.mark.parametrize(
    ("name", "kw", "shape"),
    [
        ("resnet164", {"depth": 20}, (3, 32, 32)),
        ("resnet18", {"image_size": 32}, (3, 32, 32)),
        ("mobilenet_v2", {"image_size": 32, "num_classes": 10}, (3, 32, 32)),
    ],
)
def test_traced_nets_merge_exactly_and_reload(name: str, kw: dict, shape: tuple, tmp_path) -> None:
    exact_merge(get_model(name, **kw), shape, tmp=tmp_path)


@pytest.mark.parametrize(
    ("name", "kw", "shape"),
    [
        ("resnet50", {"image_size": 32, "num_classes": 10}, (3, 32, 32)),
        ("efficientnet_b0", {"image_size": 32, "num_classes": 10}, (3, 32, 32)),
        ("regnet_x_400mf", {"image_size": 32, "num_classes": 10}, (3, 32, 32)),
    ],
)
def test_torchvision_nets_merge_exactly(name: str, kw: dict, shape: tuple) -> None:
    exact_merge(get_model(name, **kw), shape)


def test_custom_model_merges_exactly_and_reloads(tmp_path) -> None:
    model = get_model("custom", target="tests.tracing_models.mixed", image_size=16)
    exact_merge(model, (3, 16, 16), tmp=tmp_path)


def test_resnet50_traces_before_the_tracers_deadline() -> None:
    """The trace finishes (a walk past the tracer's deadline stops with a CsgdError) and
    finds the stem, each stage's residual sum and each bottleneck's two inner convs. Its
    seconds: scripts/model_table.py."""
    model = get_model("resnet50", image_size=224)
    groups = traced_groups(model)
    sums = [g.name for g in groups if g.name.endswith(".0.conv3")]
    assert sums == [f"layer{i}.0.conv3" for i in (1, 2, 3, 4)]
    assert len(groups) == 1 + 4 + 2 * 16 and groups[0].name == "conv1"


def _resnet50_c_sgd_70(size: int) -> float:
    """FLOPs reduction of experiment=resnet50_imagenet's widths at ``size`` x ``size``."""
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.common.nets import count_macs
    from csgd_cli.rules.groups import select_groups
    from csgd_cli.runner.cli import config_dir

    register_schema()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("run", ["experiment=resnet50_imagenet"])
    assert (cfg.model.name, cfg.dataset.name, cfg.ratio) == ("resnet50", "imagenet", 0.7)
    model = get_model("resnet50", image_size=size)
    groups = channel_groups(model)
    chosen = select_groups(groups, list(cfg.prune.include), list(cfg.prune.exclude))
    assert len(chosen) == 32 and all(g.name.endswith((".conv1", ".conv2")) for g in chosen)
    clusters = cluster_groups(model, chosen, target_widths(chosen, cfg.ratio), "even", 0)
    thin = merge(model, groups, clusters)
    before, after = (count_macs(m, (3, size, size)) for m in (model, thin))
    print(f"ResNet-50 C-SGD-70 at {size}x{size}: {before:,} -> {after:,} MACs")
    return 1 - after / before


def test_resnet50_imagenet_flops_at_64() -> None:
    assert abs(_resnet50_c_sgd_70(64) - 0.357) < 0.005


@pytest.mark.slow
def test_resnet50_imagenet_flops_at_224() -> None:
    assert abs(_resnet50_c_sgd_70(224) - 0.357) < 0.005


def _csgd(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


TINY_RUN = (
    "dataset=synthetic", "dataset.num_train=64", "dataset.num_test=16", "dataset.limit=32",
    "dataset.batch_size=16", "dataset.eval_batch_size=16", "dataset.num_workers=0",
    "device=cpu", "pretrain.epochs=1", "schedule.epochs=1", "finetune.epochs=1",
    "eval.latency_iters=1", "eval.latency_batch=8", "prune.force=true", "prune.export=false",
    "ratio=0.5", "clustering=even", "schedule.log_every=0", "pretrain.log_every=0",
    "finetune.log_every=0",
)  # fmt: skip


@pytest.mark.parametrize(
    "model",
    [
        ("model=mobilenet_v2", "dataset.image_size=32"),
        ("model=custom", "model._target_=tests.tracing_models.mixed", "dataset.image_size=16"),
    ],
)
def test_csgd_run_end_to_end(model: tuple, tmp_path) -> None:
    r = _csgd("run", *model, *TINY_RUN, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary
    thin = load_model(tmp_path / "pruned.pt", trust=("tests.tracing_models.mixed",))
    assert thin.arch["group_widths"]


def test_a_checkpoint_cannot_choose_the_code_that_builds_it(tmp_path) -> None:
    """A file naming a callable for model=custom is refused unless the user names it too:
    loading a checkpoint must never run code the file chose."""
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    arch = {
        "name": "custom",
        "kwargs": {"target": "subprocess.run", "args": ["touch", str(marker)]},
    }
    save_checkpoint(crafted, {"arch": arch, "state_dict": {}})
    with pytest.raises(CsgdError, match="named by the file; refused"):
        load_model(crafted)
    r = _csgd(
        "eval",
        f"ckpt={crafted}",
        "dataset=synthetic",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "model._target_=subprocess.run" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "ev").exists()


def test_csgd_groups_lists_traced_groups(tmp_path) -> None:
    r = _csgd("groups", "model=mobilenet_v2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features.1.conv.1  width 16  prunable" in r.stdout
    assert "25 groups, 25 prunable, 0 excluded" in r.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("model=torchvision", "model.name=resnet_nope"), "unknown model 'resnet_nope'"),
        (("model=custom", "model._target_=nowhere.net"), "does not import"),
        (("model=custom", "model._target_=tests.tracing_models.Untraceable"), "cannot trace"),
    ],
)
def test_bad_models_exit_2_in_one_line(args: tuple, words: str, tmp_path) -> None:
    r = _csgd("groups", *args, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_init_takes_a_plain_torchvision_state_dict(tmp_path) -> None:
    import torchvision

    from csgd_cli.api.checkpoint import load_checkpoint, model_from_checkpoint

    net = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    ck = load_checkpoint(tmp_path / "resnet18-f37072fd.pth", "init", state_dict_ok=True)
    assert ck["arch"] == {"name": "resnet18", "kwargs": {"num_classes": 10, "in_channels": 3}}
    model = model_from_checkpoint(ck, "init").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()(x))
    r = _csgd(
        "groups", "model=mobilenet_v2", f"init={tmp_path / 'resnet18-f37072fd.pth'}", cwd=tmp_path
    )
    assert r.returncode == 2 and "holds a resnet18 but model=mobilenet_v2" in r.stderr, r.stderr


def test_mnasnet_merges_saves_and_loads_through_the_api(tmp_path) -> None:
    """torchvision's MNASNet reads its module version in ``_load_from_state_dict``: the
    merge's state dict and a saved file (csgd's or an older one without versions) load."""
    import torchvision

    from csgd_cli import CSGD
    from csgd_cli.api.pruner import save

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(num_classes=10)
    x = torch.randn(4, 3, 64, 64)  # at 32 x 32 its last maps are 1 x 1 (batch statistics of 4)
    pruner = CSGD(model, x, ratio=0.5)
    opt = pruner.optimizer(0.05, epsilon=10.0, norm_epsilon=10.0, momentum=0.0)
    for _ in range(30):  # each step halves the differences inside a cluster
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    model.eval()
    thin = pruner.merge()  # exact: no force
    assert sum(p.numel() for p in thin.parameters()) < 0.5 * sum(
        p.numel() for p in model.parameters()
    )
    path = save(thin, tmp_path / "thin.pt")
    back = load_model(path, model=torchvision.models.mnasnet0_5(num_classes=10))
    with torch.no_grad():
        assert torch.equal(back(x), thin(x))
    ck = torch.load(path, weights_only=True)
    ck["state_dict"] = dict(ck["state_dict"])  # a file without module versions
    torch.save(ck, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt", model=torchvision.models.mnasnet0_5(num_classes=10))
    with torch.no_grad():
        assert torch.equal(old(x), thin(x))


class _UNet(nn.Module):
    """A small U-Net: a transposed conv upsamples, its output is concatenated with the
    encoder's skip (the decoders of segmentation networks)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(8)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        u = torch.relu(self.up_bn(self.up(self.enc2(a))))
        return self.head(self.dec(torch.cat([u, a], 1)))


@pytest.mark.parametrize("wrapped", [False, True], ids=["csgd_optimizer", "wrapped_adamw"])
def test_a_transposed_conv_decoder_prunes_exactly(wrapped: bool, tmp_path) -> None:
    """ConvTranspose2d's inputs (weight dim 0) and outputs (dim 1) are group members:
    traced, pulled together by C-SGD (its optimizer or a wrapped AdamW), merged exactly,
    saved and loaded into a fresh instance."""
    from csgd_cli import CSGD
    from csgd_cli.api.pruner import save

    torch.manual_seed(0)
    model, x = _UNet(), torch.randn(4, 3, 16, 16)
    pruner = CSGD(model, x, ratio=0.5)
    kinds = {(m.module, m.kind) for g in pruner.groups for m in g.members}
    assert {("up", "in"), ("up", "out"), ("up_bn", "channel")} <= kinds
    assert {"enc1.0", "enc2.0", "up", "dec.0"} <= set(pruner.clusters)
    if wrapped:
        opt = pruner.wrap(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0),
                          epsilon=10.0, norm_epsilon=10.0)  # fmt: skip
    else:
        opt = pruner.optimizer(0.05, epsilon=10.0, norm_epsilon=10.0, momentum=0.0)
    for _ in range(30):  # differences inside a cluster halve every step
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(x)
    thin = pruner.merge()  # no force: exact
    assert (thin.up.in_channels, thin.up.out_channels) == (8, 4)
    with torch.no_grad():
        torch.testing.assert_close(thin(x), before, rtol=1e-4, atol=1e-5)
    back = load_model(save(thin, tmp_path / "unet.pt"), model=_UNet())
    with torch.no_grad():
        assert torch.equal(back(x), thin(x))
