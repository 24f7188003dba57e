"""MNIST and Fashion-MNIST from idx files written here in the original format (gzip and
raw): exact pixels and labels, the layouts searched, the refusals, and a ``csgd run``."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import cli
from csgd_cli.runner.datasets import build_data
from csgd_cli.runner.idx import IDX_SETS, load_idx, read_idx

FILES = {  # what each array is called in the original distribution
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def write_idx(path: Path, a: np.ndarray, gz: bool) -> Path:
    """``a`` (uint8) in LeCun's idx format: 0, 0, type 0x08, ndim, big-endian dims, data."""
    head = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    raw = head + a.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_set(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0):
    """A small MNIST-shaped set (28x28 uint8, labels 0-9) as the four idx files."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for key, a in arrays.items():
        write_idx(folder / FILES[key], a, gz)
    return arrays


@pytest.fixture
def no_system_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the Debian package's files (a machine may have them) from the search."""
    for name, spec in IDX_SETS.items():
        monkeypatch.setitem(IDX_SETS, name, dataclasses.replace(spec, system_dirs=()))


def _same(got: list[torch.Tensor], want: dict[str, np.ndarray]) -> None:
    tx, ty, vx, vy = got
    assert tx.dtype == vx.dtype == torch.uint8 and ty.dtype == vy.dtype == torch.int64
    assert tx.shape == (len(want["train_x"]), 1, 28, 28)
    assert np.array_equal(tx[:, 0].numpy(), want["train_x"])
    assert np.array_equal(ty.numpy(), want["train_y"])
    assert np.array_equal(vx[:, 0].numpy(), want["test_x"])
    assert np.array_equal(vy.numpy(), want["test_y"])


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_files_load_with_exact_pixels(
    tmp_path: Path, gz: bool, layout: str, no_system_copy: None
) -> None:
    """gzip or raw, in dataset.root or in torchvision's root/<Class>/raw: the same arrays."""
    name = "fashion_mnist" if layout == "flat" else "mnist"
    folder = tmp_path if layout == "flat" else tmp_path / IDX_SETS[name].torchvision / "raw"
    want = write_set(folder, gz=gz)
    _same(load_idx(name, tmp_path, download=False), want)


def test_read_idx_other_types_and_shapes(tmp_path: Path) -> None:
    """The header's type code and dims decide the array (big-endian int32 here)."""
    a = (np.arange(24) - 5).astype(">i4").reshape(2, 3, 4)
    head = bytes([0, 0, 0x0C, 3]) + struct.pack(">3I", 2, 3, 4)
    p = tmp_path / "x-idx3-int"
    p.write_bytes(head + a.tobytes())
    got = read_idx(p)
    assert got.shape == (2, 3, 4) and np.array_equal(got, a) and got.dtype.isnative


@pytest.mark.parametrize(
    "gz, damage, says",
    [
        (False, lambda b: b[:-7], "truncated"),
        (True, lambda b: gzip.compress(gzip.decompress(b)[:-7]), "truncated"),
        (False, lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an idx file"),
        (True, lambda b: b[: len(b) // 2], "could not be read"),  # gzip stream cut short
    ],
)
def test_damaged_file_is_refused_in_one_line(tmp_path: Path, gz: bool, damage, says: str) -> None:
    p = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), gz)
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(CsgdError) as e:
        read_idx(p)
    assert says in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_mismatched_labels_are_refused(tmp_path: Path, no_system_copy: None) -> None:
    write_set(tmp_path, n_train=10, n_test=5)
    write_idx(tmp_path / FILES["test_y"], np.zeros(4, np.uint8), True)  # 5 images, 4 labels
    with pytest.raises(CsgdError, match=r"t10k-images-idx3-ubyte\.gz holds images of shape"):
        load_idx("mnist", tmp_path, download=False)
    write_idx(tmp_path / FILES["test_y"], np.full(5, 10, np.uint8), True)
    with pytest.raises(CsgdError, match="labels outside 0-9"):
        load_idx("mnist", tmp_path, download=False)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_missing_files_are_refused_naming_them_and_both_fixes(
    tmp_path: Path, name: str, no_system_copy: None
) -> None:
    write_set(tmp_path)
    (tmp_path / f"{FILES['test_y']}.gz").unlink()  # three of four present is not enough
    with pytest.raises(CsgdError) as e:
        load_idx(name, tmp_path, download=False)
    msg = str(e.value)
    assert "\n" not in msg and "not found" in msg
    assert all(f"{stem}[.gz]" in msg for stem in FILES.values())
    assert str(tmp_path) in msg and str(tmp_path / IDX_SETS[name].torchvision / "raw") in msg
    assert "dataset.download=true" in msg
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in msg


def test_download_goes_through_torchvision_and_reads_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_copy: None
) -> None:
    """download=true and no files: torchvision's class is asked (here a stand-in that
    writes what the real one would, raw files in root/FashionMNIST/raw); its failure is
    named in the refusal."""
    import torchvision.datasets as tvd

    calls: list[tuple[str, bool, bool]] = []
    wrote: dict[str, np.ndarray] = {}

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            wrote.update(write_set(Path(root) / "FashionMNIST" / "raw", gz=False, seed=3))

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    _same(load_idx("fashion_mnist", tmp_path, download=True), wrote)
    assert calls == [(str(tmp_path), True, True)]

    class Offline:
        def __init__(self, *a: object, **k: object) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(CsgdError) as e:
        load_idx("mnist", tmp_path / "empty", download=True)
    assert "download failed: Error downloading train-images-idx3-ubyte.gz" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, flip", [("fashion_mnist", True), ("mnist", False)])
def test_build_data_normalises_crops_and_keeps_the_whole_test_split(
    tmp_path: Path, name: str, flip: bool, no_system_copy: None
) -> None:
    want = write_set(tmp_path, n_train=40, n_test=20)
    cfg = SimpleNamespace(name=name, root=str(tmp_path), limit=16, batch_size=8, augment=True)
    data = build_data(cfg, seed=0, device=torch.device("cpu"), rank=0, world=1)
    i = data.info
    shape = (i.num_classes, i.in_channels, i.image_size, i.num_train, i.num_test)
    assert shape == (10, 1, 28, 16, 20) and (data.pad, data.flip) == (4, flip)
    batches = list(data.test_batches())
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    mean, std = (0.2860, 0.3530) if name == "fashion_mnist" else (0.1307, 0.3081)
    expect = (torch.from_numpy(want["test_x"]).float() / 255 - mean) / std
    assert torch.allclose(x[:, 0], expect, atol=1e-5) and y.tolist() == want["test_y"].tolist()
    xb, yb = next(iter(data.train_batches(0)))
    assert xb.shape == (8, 1, 28, 28) and set(yb.tolist()) <= set(want["train_y"][:16].tolist())


def test_cli_refuses_missing_mnist_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [f"dataset.root={tmp_path}", "dataset.download=false", "device=cpu"]
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "model=resnet20", "dataset=mnist", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
    line = next(ln for ln in err.splitlines() if "MNIST not found" in ln)
    assert "t10k-labels-idx1-ubyte[.gz]" in line and "dataset.download=true" in line


def test_csgd_run_on_fashion_mnist_fixture(tmp_path: Path, no_system_copy: None) -> None:
    """The whole pipeline (pretrain, C-SGD, prune, fine-tune) on 28x28 one-channel idx
    data; accuracies are over the fixture's 20 test images (multiples of 5%)."""
    write_set(tmp_path / "data", n_train=64, n_test=20)
    tiny = [a for a in TINY_DIGITS if not a.startswith("dataset")]
    out = tmp_path / "run"
    cli.main(
        [
            "run",
            *tiny,
            "dataset=fashion_mnist",
            f"dataset.root={tmp_path / 'data'}",
            "dataset.download=false",
            "dataset.batch_size=32",
            "pretrain.epochs=1",
            "schedule.epochs=1",
            "finetune.epochs=1",
            "schedule.log_every=0",
            "ratio=0.5",
            "prune.force=true",  # one C-SGD epoch does not collapse the clusters
            "prune.export=false",
            f"hydra.run.dir={out}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist"
    accs = [row["acc"] for row in summary["rows"].values() if "acc" in row]
    assert len(accs) >= 3 and all(abs(a / 5 - round(a / 5)) < 1e-6 for a in accs)
    arch = torch.load(out / "finetuned.pt", weights_only=True)["arch"]["kwargs"]
    assert (arch["in_channels"], arch["image_size"], arch["num_classes"]) == (1, 28, 10)
