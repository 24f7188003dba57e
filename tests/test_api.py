"""The public API in users' own training loops (the README's example runs in
tests/test_docs.py): a segmentation net and a two-headed net with GradScaler and
autocast, torch.compile, DDP (2 processes, gloo), resuming from the user's own
checkpoint, and loading into the user's class."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError


# -- networks that are not plain classifiers -----------------------------------------------
class SegNet(nn.Module):
    """A per-pixel head: its output channels are classes (never pruned)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.stem(x)))


class TwoHeads(nn.Module):
    """A detector-like net: class scores and a box map, returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU(),
        )  # fmt: skip
        self.boxes = nn.Conv2d(24, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.cls = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {"boxes": self.boxes(f), "logits": self.cls(self.pool(f).flatten(1))}


def _seg_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def _det_loss(out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out["logits"], y[:, 0, 0] % 5) + out["boxes"].square().mean()


@pytest.mark.parametrize(("net", "loss_fn"), [(SegNet, _seg_loss), (TwoHeads, _det_loss)])
def test_own_loop_with_gradscaler_and_autocast_merges_exactly(net, loss_fn) -> None:
    torch.manual_seed(0)
    model = net()
    x = torch.randn(64, 3, 8, 8)
    y = torch.randint(0, 4, (64, 8, 8))
    pruner = csgd.CSGD(model, x[:8], ratio=0.5)
    assert pruner.excluded(), "the output head's channels are an output: excluded"
    opt = pruner.optimizer(0.1, epsilon=4.0, norm_epsilon=4.0, momentum=0.0, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu")
    sched = torch.optim.lr_scheduler.StepLR(opt, 60, 0.5)
    # long enough for BN's running statistics (momentum 0.1) to forget the early steps,
    # when the members of a cluster still differed
    for step in range(150):
        i = (step * 16) % 64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x[i : i + 16]), y[i : i + 16])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert pruner.ready()
    thin = pruner.merge(x)
    rep = pruner.merge_report
    assert rep["outputs"] == (1 if net is SegNet else 2)
    assert rep["relative_logit_diff"] < 1e-5 and rep["top1_agreement"] == 1.0
    assert rep["macs_after"] < 0.6 * rep["macs_before"]
    with torch.no_grad():
        a, b = model.eval()(x), thin(x)
    for k in a if isinstance(a, dict) else [None]:
        ta, tb = (a[k], b[k]) if k else (a, b)
        assert (ta - tb).abs().max() <= 1e-5 * ta.abs().max()


def test_compiled_model_and_resume_from_the_users_own_checkpoint(tmp_path: Path) -> None:
    """``torch.compile(model)`` goes to the pruner as it is; a run saved halfway (model,
    optimizer and pruner state dicts) and resumed equals the uninterrupted run."""
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))

    def steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            loss = _det_loss(model(x), y.view(-1, 1, 1).expand(-1, 8, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()

    base = TwoHeads()
    start = {k: v.clone() for k, v in base.state_dict().items()}
    compiled = torch.compile(base, backend="eager")
    pruner = csgd.CSGD(compiled, x, ratio=0.5)
    assert pruner.model is base
    opt = pruner.optimizer(lr=0.05, epsilon=0.5)
    steps(compiled, opt, 6)
    full = {k: v.clone() for k, v in base.state_dict().items()}

    again = TwoHeads()
    again.load_state_dict(start)
    p1 = csgd.CSGD(again, x, ratio=0.5)
    o1 = p1.optimizer(lr=0.05, epsilon=0.5)
    steps(again, o1, 3)
    torch.save(
        {"model": again.state_dict(), "opt": o1.state_dict(), "pruner": p1.state_dict()},
        tmp_path / "mine.pt",
    )
    ck = torch.load(tmp_path / "mine.pt", weights_only=True)
    resumed = TwoHeads()
    resumed.load_state_dict(ck["model"])
    p2 = csgd.CSGD.from_state_dict(resumed, ck["pruner"], x)
    assert p2.clusters == pruner.clusters == p1.clusters
    o2 = p2.optimizer(lr=0.05, epsilon=0.5)
    o2.load_state_dict(ck["opt"])
    steps(resumed, o2, 3)
    for k, v in full.items():
        assert torch.allclose(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6), k


def test_load_model_resizes_the_users_class_and_never_imports_it(tmp_path: Path) -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 3, 8, 8)
    model = SegNet()
    pruner = csgd.CSGD(model, x, ratio=0.5, clusters=None)
    thin = pruner.merge(x, force=True)
    path = csgd.save(thin, tmp_path / "thin.pt")
    with pytest.raises(CsgdError, match=r"own class \(test_api.SegNet\).*model=SegNet"):
        csgd.load_model(path)
    again = csgd.load_model(path, model=SegNet())
    assert again.stem[0].out_channels == 6 and again.mid[0].out_channels == 8
    with torch.no_grad():
        assert torch.equal(again(x), thin.eval()(x))
    with pytest.raises(CsgdError, match="do not fit"):
        csgd.load_model(path, model=TwoHeads())


def test_bad_api_input_is_one_clear_error() -> None:
    model = SegNet()
    with pytest.raises(CsgdError, match=r"ratio=1\.5 is out of range"):
        csgd.CSGD(model, torch.randn(2, 3, 8, 8), ratio=1.5)
    with pytest.raises(CsgdError, match="clustering=magic is unknown"):
        csgd.CSGD(model, torch.randn(2, 3, 8, 8), clustering="magic")
    with pytest.raises(CsgdError, match="do not partition"):
        csgd.CSGD(model, torch.randn(2, 3, 8, 8), clusters={"stem.0": [[0, 1]]})
    with pytest.raises(CsgdError, match=r"not a CSGD\.state_dict"):
        csgd.CSGD.from_state_dict(model, {"clusters": {}})


# -- the user's own DDP wrapper: 2 processes (gloo) equal one --------------------------------
class GNNet(SegNet):
    """SegNet with per-channel GroupNorm (per sample, so a rank's half batch normalises
    as in one process; BatchNorm would see other statistics on each rank by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem[1] = nn.GroupNorm(12, 12)
        self.mid[1] = nn.GroupNorm(16, 16)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GNNet()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32, 8, 8), generator=g)
    pruner = csgd.CSGD(model, x[:4], ratio=0.5)
    net = DDP(model) if world > 1 else model
    opt = pruner.optimizer(lr=0.05, epsilon=0.3, momentum=0.9, weight_decay=1e-4)
    for step in range(8):
        xb, yb = x[step % 2 * 16 :][:16], y[step % 2 * 16 :][:16]
        part = slice(rank * 16 // world, (rank + 1) * 16 // world)
        loss = _seg_loss(net(xb[part]), yb[part])  # DDP averages the halves' gradients
        opt.zero_grad()
        loss.backward()
        opt.step()  # the centripetal step, on the averaged gradients
    if rank == 0:
        torch.save({"sd": model.state_dict(), "chi": pruner.chi()}, out)
    if world > 1:
        dist.destroy_process_group()


def test_the_users_ddp_wrapper_equals_one_process(tmp_path: Path) -> None:
    """float64: a 2-process DDP job of the user's loop ends where one process does."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    try:
        _ddp_worker(0, 1, port, str(one))
    finally:
        torch.set_default_dtype(torch.float32)
    mp.spawn(_ddp_worker, args=(2, port, str(two)), nprocs=2, join=True)
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a["chi"] > 0
    for k, v in a["sd"].items():
        assert v.dtype == torch.float64
        assert torch.allclose(v, b["sd"][k], rtol=1e-10, atol=1e-12), k
