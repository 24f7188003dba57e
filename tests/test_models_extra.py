"""VGG and DenseNet: shapes, rebuild from ``arch``, and their channel groups."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from csgd_cli.models import get_model

CASES = [
    ("vgg16", {}),
    ("densenet40", {}),
    ("densenet40", {"depth": 10, "growth": 4}),
]
INPUTS = [  # (extra model kwargs, input shape)
    ({}, (2, 3, 32, 32)),
    ({"in_channels": 1, "image_size": 8}, (2, 1, 8, 8)),
]
PARAMS = [
    pytest.param(name, {**kw, **extra}, shape, id=f"{name}-{kw}-{shape[-1]}")
    for name, kw in CASES
    for extra, shape in INPUTS
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small models: one thread is as fast, and does not thrash on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine params, so slicing mistakes show up."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def check_groups(model: nn.Module) -> None:
    mods = dict(model.named_modules())
    groups = model.channel_groups()
    assert len(model.widths) == len(groups)
    assert len({g.name for g in groups}) == len(groups)
    produced: list[str] = []
    for w, g in zip(model.widths, groups, strict=True):
        assert w == g.width, g.name
        assert g.producers, g.name
        for p in g.producers:
            conv = mods[p.conv]
            out = conv.out_channels if isinstance(conv, nn.Conv2d) else conv.out_features
            assert out == g.width, p.conv
            produced.append(p.conv)
            if p.norm is not None:
                assert mods[p.norm].num_features == g.width, p.norm
                produced.append(p.norm)
        for c in g.consumers:
            m = mods[c.module]
            assert c.offset >= 0
            if c.kind == "norm":
                assert isinstance(m, nn.modules.batchnorm._BatchNorm), c.module
                assert m.num_features >= c.offset + g.width, c.module
            else:
                assert isinstance(m, nn.Conv2d | nn.Linear), c.module
                cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                assert cin >= c.offset + g.width, c.module
    # Consumed modules: the groups' slices tile the whole channel dim, no gap or overlap.
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for g in groups:
        for c in g.consumers:
            spans.setdefault((c.module, c.kind), []).append((c.offset, c.offset + g.width))
    for (name, kind), sp in spans.items():
        m = mods[name]
        dim = m.num_features if kind == "norm" else getattr(m, "in_channels", None)
        dim = m.in_features if dim is None else dim
        ends = [0] + [e for _, e in sorted(sp)]
        assert [b for b, _ in sorted(sp)] == ends[:-1] and ends[-1] == dim, name
    # Each parameter-holding module produces for at most one group.
    assert len(produced) == len(set(produced))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(convs) == sorted(p for p in produced if isinstance(mods[p], nn.Conv2d))


@pytest.mark.parametrize(("name", "kw", "shape"), PARAMS)
@torch.no_grad()
def test_forward_arch_roundtrip_and_groups(name: str, kw: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    model = get_model(name, **kw).eval()
    x = torch.randn(*shape)
    assert model(x).shape == (shape[0], 10)
    check_groups(model)

    again = get_model(model.arch["name"], **model.arch["kwargs"]).eval()
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    again.load_state_dict(sd)
    torch.testing.assert_close(again(x), model(x))

    thin = get_model(name, **kw, widths=[max(1, w // 2) for w in model.widths]).eval()
    assert thin(x).shape == (shape[0], 10)
    assert thin.widths == [max(1, w // 2) for w in model.widths]
    check_groups(thin)
    n_full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in thin.parameters()) < n_full


@pytest.mark.parametrize(
    ("kw", "shape"),
    [
        ({"depth": 10, "growth": 4}, (2, 3, 32, 32)),
        ({"in_channels": 1, "image_size": 8}, (2, 1, 8, 8)),
        (
            {"depth": 13, "growth": 3, "widths": [5, 2, 4, 1, 3, 2, 5, 1, 2, 3, 7, 6]},
            (2, 3, 16, 16),
        ),
    ],
)
def test_densenet_offsets_are_functional(kw: dict, shape: tuple) -> None:
    """Each consumer really sees the group's channels at the declared offset."""
    torch.manual_seed(0)
    model = get_model("densenet40", **kw).eval()
    _randomize_norms(model)
    mods = dict(model.named_modules())
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen_in[name], seen_out[name] = args[0].detach(), out.detach()

        return fn

    for n, m in mods.items():
        if n:
            m.register_forward_hook(hook(n))
    with torch.no_grad():
        model(torch.randn(*shape))

    groups = model.channel_groups()
    norm_users = {c.module for g in groups for c in g.consumers if c.kind == "norm"}
    input_users = {c.module for g in groups for c in g.consumers if c.kind == "input"}
    assert norm_users == {n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d)}
    convs = {n for n, m in mods.items() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert input_users == convs - {"conv0"}
    for g in groups:
        (p,) = g.producers
        assert p.norm is None
        # What enters the concatenation: a transition conv's output after its pool.
        parent = p.conv.rsplit(".", 1)[0]
        src = seen_out[parent] if p.conv.startswith("trans") else seen_out[p.conv]
        norms = [c for c in g.consumers if c.kind == "norm"]
        inputs = [c for c in g.consumers if c.kind == "input"]
        assert norms and len(norms) == len(inputs)
        for nc, ic in zip(norms, inputs, strict=True):
            assert nc.offset == ic.offset
            sl = slice(nc.offset, nc.offset + g.width)
            torch.testing.assert_close(seen_in[nc.module][:, sl], src)
            # The paired conv/linear reads relu(bn(.)) of these channels at the same
            # offset, computed here from the norm's own parameters sliced at the offset.
            bn: nn.BatchNorm2d = mods[nc.module]
            scale = bn.weight[sl] / torch.sqrt(bn.running_var[sl] + bn.eps)
            shift = bn.bias[sl] - bn.running_mean[sl] * scale
            act = torch.relu(src * scale[:, None, None] + shift[:, None, None])
            got = seen_in[ic.module]
            if isinstance(mods[ic.module], nn.Linear):
                act = act.mean((2, 3))
            torch.testing.assert_close(got[:, sl], act, rtol=1e-4, atol=1e-5)


def test_densenet40_layout() -> None:
    model = get_model("densenet40")
    names = [g.name for g in model.channel_groups()]
    assert names[0] == "conv0" and names[1] == "dense1.0.conv"
    assert names[36] == "dense3.11.conv" and names[-2:] == [
        "trans1.conv",
        "trans2.conv",
    ]
    assert model.widths == [16] + [12] * 36 + [160, 304]
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    with pytest.raises(Exception, match="depth"):
        get_model("densenet40", depth=41)


def test_vgg_layout_and_small_inputs() -> None:
    model = get_model("vgg16", in_channels=1, image_size=8)
    assert model.widths == [
        64,
        64,
        128,
        128,
        256,
        256,
        256,
        512,
        512,
        512,
        512,
        512,
        512,
    ]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 -> 4 -> 2 -> 1, then the remaining pools are skipped
    groups = model.channel_groups()
    assert groups[0].name == "features.0" and groups[-1].consumers[0].module == "classifier.0"
    assert len(get_model("vgg11").widths) == 8 and len(get_model("vgg19").widths) == 16
    # Skipped pools keep the module indices, so the state_dict keys match any image size.
    assert list(model.state_dict()) == list(get_model("vgg16").state_dict())
