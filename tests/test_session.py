"""Unit tests of ``csgd_cli.runner.session`` (what a stage sets up: seeds, device, data, model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from csgd_cli.api.checkpoint import save_checkpoint
from csgd_cli.common.config import register_schema
from csgd_cli.common.errors import CsgdError
from csgd_cli.models import custom, get_model, timm_models
from csgd_cli.runner.data import DataInfo
from csgd_cli.runner.session import Ctx, load, new_model, setup, start_model, trust_named_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_schema()
WIDTHS = [4, 8, 8, 4, 4, 4, 8, 8, 8, 8, 8, 8]  # TINY_DIGITS' resnet20


def composed(*overrides: str, tiny: bool = True) -> DictConfig:
    """``csgd train``'s config: the tiny ResNet-20 on digits (``tiny``), then ``overrides``."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=[*(TINY_DIGITS if tiny else []), *overrides])


def info(num_classes: int = 10, in_channels: int = 1) -> DataInfo:
    return DataInfo("digits", num_classes, in_channels, 8, 256, 360)


def saved(path: Path, **kw: int) -> tuple[Path, torch.nn.Module]:
    """A csgd checkpoint of a tiny resnet20 (``kw``: its shape), as stages write them."""
    torch.manual_seed(1)
    net = get_model("resnet20", widths=WIDTHS, **kw)
    save_checkpoint(path, {"arch": net.arch, "state_dict": net.state_dict()})
    return path, net


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return setup(composed(), tmp_path_factory.mktemp("out"))


# -- setup ---------------------------------------------------------------------------------
def test_setup_makes_the_context_of_the_config(ctx: Ctx) -> None:
    assert ctx.cfg.model.name == "resnet20" and ctx.out.is_dir()
    assert ctx.device == torch.device("cpu")  # device=cpu, whatever the machine has
    assert ctx.data.info == DataInfo("digits", 10, 1, 8, 256, 360)  # dataset.limit=256


def test_setup_seeds_every_generator_by_the_config(tmp_path: Path) -> None:
    import random

    import numpy as np

    def draws(seed: int) -> tuple:
        setup(composed(f"seed={seed}"), tmp_path)
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    assert draws(3) == draws(3)
    a, b = draws(3), draws(4)
    assert all(x != y for x, y in zip(a, b, strict=True))


# -- new_model -----------------------------------------------------------------------------
def test_new_model_is_shaped_for_the_data_set() -> None:
    net = new_model(composed(), info(num_classes=3, in_channels=2))
    assert net(torch.zeros(2, 2, 8, 8)).shape == (2, 3)
    assert net.arch["kwargs"] == {"num_classes": 3, "in_channels": 2, "image_size": 8,
                                  "widths": WIDTHS}  # fmt: skip


def test_new_model_without_a_data_set_takes_the_models_defaults() -> None:
    net = new_model(composed())
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # resnet20's CIFAR defaults
    assert net.arch["kwargs"] == {"widths": WIDTHS}


# -- load ----------------------------------------------------------------------------------
def test_load_rebuilds_the_network_and_returns_its_checkpoint(tmp_path: Path) -> None:
    path, net = saved(tmp_path / "a.pt", num_classes=10, in_channels=1)
    model, ck = load(str(path), "ckpt", info())
    assert same_weights(model, net) and ck["arch"] == net.arch


@pytest.mark.parametrize(
    ("key", "label"), [("ckpt", "ckpt={}"), ("init", "init={}"), ("run", "{}")]
)
def test_load_refuses_a_model_of_another_data_shape(tmp_path: Path, key: str, label: str) -> None:
    """In one line naming the file as the user gave it (``key=path``; the path alone for
    a file the run wrote) and the shape that differs."""
    path, _ = saved(tmp_path / "a.pt", num_classes=10, in_channels=1)
    with pytest.raises(CsgdError) as e:
        load(str(path), key, info(num_classes=3))
    msg = str(e.value)
    assert msg.startswith(label.format(path) + " was built for num_classes=10 but dataset ")
    assert msg.endswith("has 3; pass the dataset= the checkpoint was trained on")
    with pytest.raises(CsgdError, match="in_channels=1 but dataset digits has 3"):
        load(str(path), key, info(in_channels=3))


def test_load_without_a_data_set_checks_no_shape(tmp_path: Path) -> None:
    path, net = saved(tmp_path / "a.pt", num_classes=10, in_channels=1)
    model, _ = load(str(path), "ckpt")  # csgd groups / check read no data set
    assert same_weights(model, net)


def test_load_names_a_missing_file_by_its_key(tmp_path: Path) -> None:
    with pytest.raises(CsgdError, match=r"^init=\S+nope\.pt: no such file; pass init= "):
        load(str(tmp_path / "nope.pt"), "init")


def test_only_init_takes_a_plain_torchvision_state_dict(tmp_path: Path) -> None:
    from torchvision.models import shufflenet_v2_x0_5

    torch.manual_seed(0)
    tv = shufflenet_v2_x0_5(num_classes=10)
    path = tmp_path / "shufflenet_v2_x0_5-weights.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(CsgdError, match=r"is not a csgd checkpoint \(no arch/state_dict\)"):
        load(str(path), "ckpt")
    model, ck = load(str(path), "init", info(in_channels=3))
    assert ck["arch"]["name"] == "shufflenet_v2_x0_5"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), tv.eval()(x))


# -- start_model ---------------------------------------------------------------------------
def test_start_model_takes_the_first_key_given(ctx: Ctx, tmp_path: Path) -> None:
    a, net_a = saved(tmp_path / "a.pt", num_classes=10, in_channels=1)
    torch.manual_seed(2)
    net_b = get_model("resnet20", widths=WIDTHS, num_classes=10, in_channels=1)
    b = save_checkpoint(tmp_path / "b.pt", {"arch": net_b.arch, "state_dict": net_b.state_dict()})
    both = dataclasses.replace(ctx, cfg=composed(f"init={a}", f"ckpt={b}"))
    model, ck = start_model(both, "init", "ckpt")
    assert same_weights(model, net_a) and ck["arch"] == net_a.arch
    model, _ = start_model(both, "ckpt", "init")
    assert same_weights(model, net_b)
    only_ckpt = dataclasses.replace(ctx, cfg=composed(f"ckpt={b}"))
    assert same_weights(start_model(only_ckpt, "init", "ckpt")[0], net_b)


def test_start_model_checks_the_file_against_the_data(ctx: Ctx, tmp_path: Path) -> None:
    path, _ = saved(tmp_path / "rgb.pt", num_classes=10, in_channels=3)
    with pytest.raises(CsgdError, match=r"^init=\S+rgb\.pt was built for in_channels=3"):
        start_model(dataclasses.replace(ctx, cfg=composed(f"init={path}")), "init")


def test_start_model_without_weights_builds_a_fresh_model_for_the_data(ctx: Ctx) -> None:
    model, ck = start_model(ctx, "init", "ckpt")
    assert ck == {}
    assert model.arch["kwargs"]["num_classes"] == 10 and model.arch["kwargs"]["in_channels"] == 1
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


# -- trust_named_model ---------------------------------------------------------------------
@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The process's trusted callables, empty for this test only."""
    monkeypatch.setattr(custom, "_TRUSTED", set())
    monkeypatch.setattr(timm_models, "_PLAIN", {})
    monkeypatch.delenv("CSGD_TRUST", raising=False)
    return custom._TRUSTED


def test_csgd_trust_names_the_callables_checkpoints_may_build(
    trusted: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trust_named_model(composed())
    with pytest.raises(CsgdError, match=r"CSGD_TRUST=pkg\.make\)$"):
        custom.require_trusted("pkg.make", "ckpt=x.pt")
    monkeypatch.setenv("CSGD_TRUST", "pkg.make,other.build")
    trust_named_model(composed())
    custom.require_trusted("pkg.make", "ckpt=x.pt")
    custom.require_trusted("other.build", "ckpt=x.pt")
    assert trusted == {"pkg.make", "other.build"}  # no empty name from the split


def test_a_custom_models_target_is_trusted(trusted: set[str]) -> None:
    trust_named_model(composed("model=custom", "model._target_=mypkg.nets.Net"))
    custom.require_trusted("mypkg.nets.Net", "ckpt=x.pt")
    assert trusted == {"mypkg.nets.Net"}


def test_model_timm_names_what_a_plain_state_dict_holds(trusted: set[str]) -> None:
    plain = {"fc.weight": torch.zeros(10, 4)}
    trust_named_model(composed("model=timm", "model.name=test_resnet", tiny=False))
    with pytest.raises(CsgdError, match="is not a state dict of timm model test_resnet"):
        timm_models.plain_checkpoint(plain, "init=w.pth")
    trust_named_model(composed())  # a later stage of another model: no longer timm's
    assert timm_models.plain_checkpoint(plain, "init=w.pth") is None
