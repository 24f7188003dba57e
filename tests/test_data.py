"""Tests for csgd_cli.runner.data: loaders, seeded/resumable/sharded order, augmentation."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.data import augment_batch, normalize
from csgd_cli.runner.datasets import DATASETS, build_data

CPU = torch.device("cpu")


def cfg(**kw: object) -> SimpleNamespace:
    base = {
        "name": "synthetic",
        "root": "unused",
        "batch_size": 8,
        "eval_batch_size": 16,
        "limit": None,
        "download": False,
        "augment": False,
        "num_workers": 0,
        "num_train": 64,
        "num_test": 32,
    }
    return SimpleNamespace(**{**base, **kw})


def unnormalize(x: torch.Tensor, data) -> torch.Tensor:
    mean, std = data.mean.view(1, -1, 1, 1), data.std.view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def collect(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- CIFAR -----------------------------------------------------------------------


def test_cifar10_loads_through_torchvision_with_exact_pixels(cifar_root) -> None:
    """The fixture writes the original cifar-10-batches-py pickles (5 data batches, test
    batch, batches.meta) and patches torchvision's expected MD5s to the MD5s of the files
    it wrote (see conftest.patch_cifar_md5); loading goes through the real CIFAR10."""
    files = cifar_root("cifar10", n_train=50, n_test=20)
    data = build_data(
        cfg(name="cifar10", root=str(files.root), eval_batch_size=7), seed=0, device=CPU
    )
    i = data.info
    assert (i.num_classes, i.in_channels, i.image_size) == (10, 3, 32)
    assert (i.num_train, i.num_test) == (50, 20)
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (50, 3, 32, 32)
    assert torch.equal(data.train_x, torch.from_numpy(files.train_x))
    assert torch.equal(data.train_y, torch.from_numpy(files.train_y))
    assert torch.equal(data.test_x, torch.from_numpy(files.test_x))
    batches = collect(data.test_batches())
    assert [len(y) for _, y in batches] == [7, 7, 6]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.5
    assert torch.equal(unnormalize(x, data), torch.from_numpy(files.test_x))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(files.test_y))


def test_cifar100_loads_through_torchvision(cifar_root) -> None:
    """Same for cifar-100-python/{train,test,meta} with fine labels (MD5s patched)."""
    files = cifar_root("cifar100", n_train=30, n_test=10)
    data = build_data(cfg(name="cifar100", root=str(files.root)), seed=0, device=CPU)
    assert (data.info.num_classes, data.info.num_train, data.info.num_test) == (
        100,
        30,
        10,
    )
    assert torch.equal(data.train_x, torch.from_numpy(files.train_x))
    assert torch.equal(data.test_y, torch.from_numpy(files.test_y))


def test_cifar_absent_without_download_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CsgdError) as err:
        build_data(cfg(name="cifar10", root=str(tmp_path)), seed=0, device=CPU)
    msg = str(err.value)
    assert f"dataset.root={tmp_path}" in msg and "CIFAR-10" in msg and "\n" not in msg


def test_cifar_download_failure_is_csgd_error(tmp_path: Path, monkeypatch) -> None:
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(CsgdError, match=r"dataset\.root="):
        build_data(cfg(name="cifar100", root=str(tmp_path), download=True), seed=0, device=CPU)


def test_cifar_present_files_are_never_redownloaded(cifar_root, monkeypatch) -> None:
    """Files present but not matching the real MD5s (no patching here): torchvision must
    not be asked to download over them; the integrity failure is a CsgdError."""
    files = cifar_root("cifar10", n_train=10, n_test=5, patch_md5=False)

    def forbidden(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", forbidden)
    with pytest.raises(CsgdError, match="could not be loaded"):
        build_data(cfg(name="cifar10", root=str(files.root), download=True), seed=0, device=CPU)


# --- digits ----------------------------------------------------------------------


def test_digits_split_shapes_and_limit() -> None:
    a = build_data(cfg(name="digits"), seed=0, device=CPU)
    b = build_data(cfg(name="digits"), seed=123, device=CPU)
    assert (a.info.in_channels, a.info.image_size, a.info.num_classes) == (1, 8, 10)
    assert a.info.num_train + a.info.num_test == 1797 and a.info.num_test == 360
    assert a.train_x.shape == (1437, 1, 8, 8) and int(a.train_x.max()) == 255
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_x, b.train_x)
    lim = build_data(cfg(name="digits", limit=100), seed=0, device=CPU)
    assert lim.info.num_train == 100 and torch.equal(lim.train_x, a.train_x[:100])
    assert torch.allclose(lim.mean, a.mean)  # stats come from the whole train split
    x, y = next(lim.train_batches(0))
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.int64


# --- synthetic: order, resume, sharding ------------------------------------------


def test_synthetic_is_deterministic_and_learnable() -> None:
    a = build_data(cfg(num_train=200, num_test=100), seed=0, device=CPU)
    b = build_data(cfg(num_train=300, num_test=100), seed=7, device=CPU)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_x, b.train_x[:200])
    assert (a.info.in_channels, a.info.image_size, a.info.num_classes) == (3, 32, 10)
    # nearest class mean separates the classes: a tiny model can learn this
    means = torch.stack([a.train_x[a.train_y == c].float().mean(0) for c in range(10)])
    dist = torch.cdist(a.test_x.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == a.test_y).float().mean() > 0.9


def test_synthetic_dictconfig_and_order() -> None:
    conf = OmegaConf.create(vars(cfg(augment=True)))
    data = build_data(conf, seed=3, device=CPU)
    assert data.steps_per_epoch() == 8
    assert_same_batches(collect(data.train_batches(0)), collect(data.train_batches(0)))
    assert not torch.equal(data.epoch_indices(0), data.epoch_indices(1))
    assert sorted(data.epoch_indices(1).tolist()) == list(range(64))
    other = build_data(conf, seed=4, device=CPU)
    assert not torch.equal(data.epoch_indices(0), other.epoch_indices(0))


def test_unaugmented_batches_follow_epoch_indices() -> None:
    data = build_data(cfg(), seed=0, device=CPU)
    idx = data.epoch_indices(2)
    for step, (x, y) in enumerate(data.train_batches(2)):
        sel = idx[step * 8 : (step + 1) * 8]
        assert torch.equal(x, normalize(data.train_x[sel], data.mean, data.std))
        assert torch.equal(y, data.train_y[sel])


def test_resume_from_start_step_is_bit_identical() -> None:
    data = build_data(cfg(augment=True), seed=11, device=CPU)
    full = collect(data.train_batches(5))
    assert_same_batches(collect(data.train_batches(5, start_step=3)), full[3:])
    # a fresh object (as after a restart) gives the same batches too
    again = build_data(cfg(augment=True), seed=11, device=CPU)
    assert_same_batches(collect(again.train_batches(5, start_step=6)), full[6:])


def test_sharding_is_disjoint_and_covers_the_epoch() -> None:
    """batch_size is the global batch: each rank takes its half of every step's
    single-process batch (tests/test_distributed.py checks augmentation too)."""
    kw = {"seed": 1, "device": CPU, "world": 2}
    ranks = [build_data(cfg(num_train=65), rank=r, **kw) for r in (0, 1)]
    single = build_data(cfg(num_train=65), seed=1, device=CPU)
    assert torch.equal(ranks[0].epoch_indices(4), single.epoch_indices(4))
    assert ranks[0].steps_per_epoch() == ranks[1].steps_per_epoch() == 8
    ys = [[y for _, y in d.train_batches(4)] for d in ranks]
    assert all(len(y) == 4 for y in ys[0] + ys[1])
    whole = [y for _, y in single.train_batches(4)]
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*ys, whole, strict=True))


def test_fewer_samples_than_batch_gives_one_full_batch() -> None:
    data = build_data(cfg(batch_size=100, limit=40), seed=0, device=CPU)
    assert data.info.num_train == 40 and data.steps_per_epoch() == 1
    (x, _), *rest = list(data.train_batches(0))
    assert x.shape[0] == 40 and not rest
    assert data.sample_batch(5)[0].shape == (5, 3, 32, 32)


# --- augment_batch ---------------------------------------------------------------


def test_augment_batch_is_a_shifted_or_flipped_crop_of_the_padded_input() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(x, 4, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        crops = {
            (dy, dx): padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)
        }
        matches = [
            (dy, dx, f)
            for (dy, dx), c in crops.items()
            for f in (0, 1)
            if torch.equal(out[i], c.flip(-1) if f else c)
        ]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) > 8 and {m[2] for m in seen} == {0, 1}
    again = augment_batch(x, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(augment_batch(x, 0, False, torch.Generator()), x)


def test_augment_without_flip_never_flips() -> None:
    x = torch.arange(8 * 8, dtype=torch.uint8).view(1, 1, 8, 8).repeat(32, 1, 1, 1)
    out = augment_batch(x, 1, False, torch.Generator().manual_seed(0))
    padded = F.pad(x, (1, 1, 1, 1))
    for i in range(32):
        assert any(
            torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
            for dy in range(3)
            for dx in range(3)
        )


# --- imagenet (ImageFolder) ------------------------------------------------------


def _image_folder(root: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for k in range(3):
                px = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(px.numpy()).save(root / split / cls / f"{k}.png")


def test_imagenet_folder_batches_and_resume(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    c = cfg(
        name="imagenet",
        root=str(tmp_path),
        image_size=16,
        batch_size=2,
        eval_batch_size=4,
        augment=True,
    )
    data = build_data(c, seed=0, device=CPU)
    assert (data.info.num_classes, data.info.image_size, data.info.num_train) == (
        2,
        16,
        6,
    )
    full = collect(data.train_batches(1))
    assert len(full) == data.steps_per_epoch() == 3
    assert full[0][0].shape == (2, 3, 16, 16) and full[0][1].dtype == torch.int64
    assert_same_batches(collect(data.train_batches(1, start_step=1)), full[1:])
    assert [len(y) for _, y in data.test_batches()] == [4, 2]
    x, y = data.sample_batch(3)
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 0]


def test_imagenet_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CsgdError, match=r"dataset\.root=.*root/train/<class>"):
        build_data(cfg(name="imagenet", root=str(tmp_path / "nope")), seed=0, device=CPU)
    (tmp_path / "train" / "ant").mkdir(parents=True)
    (tmp_path / "val" / "ant").mkdir(parents=True)
    with pytest.raises(CsgdError, match=r"dataset\.root="):
        build_data(cfg(name="imagenet", root=str(tmp_path)), seed=0, device=CPU)


# --- errors ----------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(CsgdError) as err:
        build_data(cfg(name="svhn"), seed=0, device=CPU)
    assert all(n in str(err.value) for n in DATASETS)


def test_bad_sizes() -> None:
    with pytest.raises(CsgdError, match="limit"):
        build_data(cfg(limit=0), seed=0, device=CPU)
    with pytest.raises(CsgdError, match="num_train"):
        build_data(cfg(num_train=0), seed=0, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_shapes() -> None:
    data = build_data(cfg(augment=True), seed=0, device=torch.device("cuda"))
    x, y = next(data.train_batches(0))
    assert x.is_cuda and y.is_cuda and x.shape == (8, 3, 32, 32)


def test_dataset_defaults_have_one_source() -> None:
    """A data set built from a bare config equals the composed one."""
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.cli import config_dir
    from csgd_cli.runner.datasets import build_data

    register_schema()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        full = compose("train", ["dataset=synthetic"]).dataset
    bare = OmegaConf.create({"name": "synthetic"})
    a, b = (build_data(c, seed=0, device=torch.device("cpu")) for c in (full, bare))
    assert a.info == b.info
    for key in ("augment", "batch_size", "eval_batch_size"):
        assert getattr(a, key) == getattr(b, key), key
