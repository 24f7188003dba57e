"""The centripetal optimizer against DESIGN.md's dense formula, and chi's decay rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.core.optim import CentripetalSGD
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup, producer, reader


def dense_m(clusters: list[list[int]], n: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.float64)
    for c in clusters:
        for i in c:
            m[i, c] = 1.0 / len(c)
    return m


@pytest.mark.parametrize("name", ["resnet20", "densenet40"])
def test_transformed_gradient_matches_dense_formula(name: str) -> None:
    torch.manual_seed(0)
    kw = {"depth": 10, "growth": 4} if name == "densenet40" else {}
    model = get_model(name, **kw).double()
    groups = model.channel_groups()
    clusters = cluster_groups(model, groups, target_widths(groups, 0.5), "kmeans", 0)
    model(torch.randn(4, 3, 32, 32, dtype=torch.float64)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    kern = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam, eps, norm_eps = 1e-4, 3e-3, 7e-4
    opt = CentripetalSGD(
        model, groups, clusters, lr=0.1, epsilon=eps, weight_decay=lam, norm_epsilon=norm_eps
    )
    opt.transform_()
    params = dict(model.named_parameters())
    expected = {n: g + lam * kern[n] for n, g in grads.items()}  # plain SGD elsewhere
    for g in groups:
        m = dense_m(clusters[g.name], g.width)

        def rule(name: str, rows: slice, e: float, decay: float, g=g, m=m) -> None:
            gg, kk = grads[name][rows].reshape(g.width, -1), kern[name][rows].reshape(g.width, -1)
            want = m @ gg + (decay + e) * kk - e * m @ kk
            expected[name][rows] = want.reshape(expected[name][rows].shape)

        for p in g.producers:
            rule(f"{p.conv}.weight", slice(None), eps, lam)
            if p.norm:
                rule(f"{p.norm}.weight", slice(None), norm_eps, 0.0)
                rule(f"{p.norm}.bias", slice(None), norm_eps, 0.0)
        for c in g.consumers:
            if c.kind == "norm":  # DenseNet: BN over a concatenation, at the offset
                rows = slice(c.offset, c.offset + g.width)
                rule(f"{c.module}.weight", rows, norm_eps, 0.0)
                rule(f"{c.module}.bias", rows, norm_eps, 0.0)
    checked_conv = checked_norm = 0
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0, msg=n)
        checked_conv += p.dim() == 4
        checked_norm += p.dim() == 1
    assert checked_conv > 5 and checked_norm > 5


def test_momentum_step_matches_torch_sgd_outside_groups() -> None:
    torch.manual_seed(0)
    a = get_model("resnet20").double()
    b = get_model("resnet20").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ours = CentripetalSGD(b, b.channel_groups(), {}, lr=0.1, epsilon=0.0, weight_decay=1e-4)
    for _ in range(3):
        for m, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=n)


def test_chi_shrinks_by_predicted_factor() -> None:
    """Every member of a cluster gets the cluster's mean gradient, so however different
    the raw gradients, members differ only by the centripetal pull:
    d <- d - lr (lam + eps) d per step (no momentum), so chi falls by (1 - lr (lam+eps))^2.
    The singleton cluster takes a plain SGD step with weight decay."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 6, 3, bias=False).double()
    net = nn.Sequential(conv)
    group = ChannelGroup("g", 6, producer("0") + reader("out"))
    clusters = {"g": [[0, 1, 2], [3, 4], [5]]}
    lr, lam, eps = 0.1, 1e-2, 0.5
    opt = CentripetalSGD(
        net, [group], clusters, lr=lr, epsilon=eps, momentum=0.0, nesterov=False, weight_decay=lam
    )
    factor = (1 - lr * (lam + eps)) ** 2
    prev = chi_report(net, [group], clusters)["chi"]
    coef = torch.randn(6, 2, 3, 3, dtype=torch.float64)  # a different gradient per filter
    for _ in range(5):
        opt.zero_grad()
        single = conv.weight[5].detach().clone()
        (conv.weight * coef).sum().backward()
        opt.step()
        now = chi_report(net, [group], clusters)["chi"]
        assert now == pytest.approx(prev * factor, rel=1e-9)  # raw G would change chi
        torch.testing.assert_close(conv.weight[5], single - lr * (coef[5] + lam * single))
        prev = now


def test_model_zero_grad_does_not_detach_the_buffer() -> None:
    """``model.zero_grad()`` sets grads to None; the next step must still train every
    parameter (the optimizer re-attaches them to its buffer)."""
    torch.manual_seed(0)
    m = get_model("resnet20")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = CentripetalSGD(m, m.channel_groups(), {}, lr=0.1, epsilon=0.0)
    before = [p.detach().clone() for p in m.parameters()]
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


def test_conv_bias_gets_the_centripetal_rule_with_norm_epsilon() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.ReLU(), nn.Conv2d(6, 2, 1)).double()
    group = ChannelGroup("g", 6, producer("0") + reader("2"))
    clusters = {"g": [[0, 3, 5], [1, 2], [4]]}
    net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().sum().backward()
    g0 = net[0].bias.grad.clone()
    b0 = net[0].bias.detach().clone()
    lam, eps, neps, nwd = 1e-4, 0.3, 0.07, 0.01
    opt = CentripetalSGD(
        net,
        [group],
        clusters,
        lr=0.1,
        epsilon=eps,
        weight_decay=lam,
        norm_epsilon=neps,
        norm_weight_decay=nwd,
    )
    opt.transform_()
    m = torch.zeros(6, 6, dtype=torch.float64)
    for c in clusters["g"]:
        for i in c:
            m[i, c] = 1 / len(c)
    want = m @ g0 + (nwd + neps) * b0 - neps * m @ b0
    torch.testing.assert_close(net[0].bias.grad, want, atol=1e-12, rtol=0)
    assert not torch.allclose(m @ g0, g0)  # the gradients differ: the mean is visible
