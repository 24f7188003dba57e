"""``CSGD.wrap``: C-SGD over any torch optimizer (AdamW, SGD)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))] * n


def _member_diffs(pruner: csgd.CSGD) -> dict[str, torch.Tensor]:
    """Per group: every kernel row minus its cluster's first member (the differences)."""
    mods = dict(pruner.model.named_modules())
    out = {}
    for g in pruner.groups:
        if g.name not in pruner.clusters:
            continue
        w = mods[g.name].weight.detach().flatten(1)
        out[g.name] = torch.cat([w[c] - w[c[0]] for c in pruner.clusters[g.name]])
    return out


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for x, y in _data(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_wrapped_sgd_is_centripetal_sgd_step_for_step() -> None:
    """Plain SGD wrapped = CentripetalSGD (no momentum): the same weights after training."""
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    pa = csgd.CSGD(a, x, ratio=0.5)
    pb = csgd.CSGD(b, x, clusters=pa.clusters)
    eps = {"epsilon": 0.5, "norm_epsilon": 0.05}
    lr, wd = 0.1, 1e-2
    ref = pa.optimizer(lr=lr, momentum=0.0, nesterov=False, weight_decay=wd,
                       plain_norm_weight_decay=0.0, **eps)  # fmt: skip
    # the reference gives a pruned group's norm/bias rows no weight decay: same split here
    kernels = [p for p in b.parameters() if p.dim() > 1]
    ones = [p for p in b.parameters() if p.dim() == 1]
    opt = pb.wrap(torch.optim.SGD([{"params": kernels, "weight_decay": wd},
                                   {"params": ones, "weight_decay": 0.0}], lr=lr), **eps)  # fmt: skip
    _train(a, ref, 6)
    _train(b, opt, 6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_differences_shrink_at_the_c_sgd_rate(kind: str) -> None:
    """Each step multiplies the members' differences by 1 - lr (lam + eps): C-SGD's decay,
    with AdamW (decoupled decay) as with SGD; the merge after training is exact."""
    torch.manual_seed(0)
    model = Net()
    pruner = csgd.CSGD(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    lr, wd, eps = 0.05, 0.1, 2.0
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    opt = pruner.wrap(cls(model.parameters(), lr=lr, weight_decay=wd), epsilon=eps,
                      norm_epsilon=eps)  # fmt: skip
    before = _member_diffs(pruner)
    steps = 5
    _train(model, opt, steps)
    after = _member_diffs(pruner)
    rate = (1 - lr * (wd + eps)) ** steps
    # the chi forecast covers it: C-SGD without momentum, the optimizer's decay included
    fc = pruner.forecast([lr] * steps, epsilon=eps, momentum=0.0, nesterov=False, weight_decay=wd)
    assert fc.kernel == pytest.approx(rate, rel=1e-9)
    for name in before:
        torch.testing.assert_close(after[name], before[name] * rate, rtol=1e-4, atol=1e-6)
    # Adam's moment estimates of the members stay identical
    if kind == "adamw":
        w = model.conv1.weight
        m = opt.state[w]["exp_avg_sq"].flatten(1)
        for c in pruner.clusters["conv1"]:
            assert torch.equal(m[c], m[c[:1]].expand(len(c), -1))
    # the decay reaches zero: long training, then an exact merge
    _train(model, opt, 150)
    assert pruner.chi_report()["relative"] < 1e-12
    thin = pruner.merge(tolerance=1e-5)
    assert pruner.merge_report["top1_agreement"] == 1.0
    assert thin.conv1.out_channels == 4 and thin.conv2.out_channels == 4


def test_wrap_averages_existing_state_and_refuses_a_second_wrap() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 2)  # state differs per member
    pruner = csgd.CSGD(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    pruner.wrap(opt)
    m = opt.state[model.conv1.weight]["exp_avg"].flatten(1)
    for c in pruner.clusters["conv1"]:
        torch.testing.assert_close(m[c], m[c[:1]].expand(len(c), -1))
    with pytest.raises(CsgdError, match="wrapped already"):
        pruner.wrap(opt)
