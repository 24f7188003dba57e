"""The data sets csgd reads: CIFAR-10/100 (torchvision's files), MNIST and Fashion-MNIST
(idx files, ``idx.py``), scikit-learn's digits, synthetic images, and ImageNet-style
folders; ``build_data`` gives this rank's view.

What a load reads from disk is kept for the life of the process (a few entries), so the
preflight's check and the stage that follows read a data set once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.errors import CsgdError
from .data import Data, DataInfo, FolderData, TensorData, conf_value, mix_seed
from .distributed import rank_world
from .idx import load_idx

# what torchvision's CIFAR raises when offline (URLError is an OSError) or on bad files
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError)
# per-channel mean/std in [0, 1] units
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
}
# (classes, crop padding, horizontal flip); digits are not mirror-symmetric, clothes are
_TENSOR_SETS = {
    "cifar10": (10, 4, True),
    "cifar100": (100, 4, True),
    "fashion_mnist": (10, 4, True),
    "mnist": (10, 4, False),
    "digits": (10, 1, False),
    "synthetic": (10, 4, True),
}
DATASETS = (*_TENSOR_SETS, "imagenet")  # every name build_data knows
_SYNTH_SEED = 20190613  # fixed, so synthetic train and test share one distribution
_LOADED: dict[tuple[Any, ...], Any] = {}  # what a load read, by what it read


def _remember(key: tuple[Any, ...], load: Any) -> Any:
    """``load()``, read once per process for the same key (the last few are kept)."""
    if key not in _LOADED:
        while len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load()
    return _LOADED[key]


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise CsgdError(f"unknown dataset '{name}'", f"choose dataset=<{'|'.join(DATASETS)}>")


def _load_cifar(name: str, root: Path, download: bool) -> list[Tensor]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    present = all((root / cls.base_folder / f).is_file() for f in files)
    fix = (
        f"put {cls.base_folder} there (dataset.root={root}) or set"
        " dataset.download=true, or use dataset=digits / dataset=synthetic offline"
    )
    if not present and not download:
        raise CsgdError(f"{label} not found under {root}", fix)
    try:  # torchvision may download only when the files are really absent
        sets = [cls(str(root), train=t, download=download and not present) for t in (True, False)]
    except _LOAD_ERRORS as e:
        raise CsgdError(f"{label} could not be loaded from {root} ({e})", fix) from None
    out: list[Tensor] = []
    for s in sets:  # NHWC numpy -> NCHW tensor, once
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)]
    return out


# sets read from files, with published stats: name -> load(name, root, download)
_FILE_SETS = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "fashion_mnist": load_idx,
    "mnist": load_idx,
}


def _load_digits() -> list[Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    # a split independent of the run seed keeps test accuracy comparable across seeds
    split = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    return [t[torch.from_numpy(i)] for i in split for t in (x, y)]


def _synthetic(
    num_train: int, num_test: int, image_size: int = 32, num_classes: int = 10
) -> list[Tensor]:
    """Learnable data of any size: per-class prototypes plus pixel noise. Prototypes
    are smooth (4x4 upsampled) so crops and flips keep the class evidence. The default
    (3x32x32, 10 classes) is CIFAR-shaped; ``image_size=224, num_classes=1000`` is
    ImageNet-shaped for offline smoke runs of ImageNet models."""
    g = torch.Generator().manual_seed(_SYNTH_SEED)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g) * 255
    protos = F.interpolate(protos, size=image_size, mode="bilinear")
    # fixed-size blocks, each with its own generator: the test set does not depend on
    # num_train, and a smaller num_train is a prefix of a larger one (blocks hold about
    # 1024 CIFAR-sized images' worth of pixels, to bound memory at large sizes)
    size = max(1, 1024 * 32 * 32 // (image_size * image_size))
    out: list[Tensor] = []
    for split, n in enumerate((num_train, num_test)):
        xs, ys = [], []
        for block in range(0, n, size):
            gb = torch.Generator().manual_seed(mix_seed(_SYNTH_SEED, split, block))
            y = torch.randint(0, num_classes, (size,), generator=gb)[: n - block]
            noise = 40 * torch.randn(len(y), 3, image_size, image_size, generator=gb)
            xs.append((protos[y] + noise).clamp_(0, 255).round_().to(torch.uint8))
            ys.append(y)
        out += [torch.cat(xs), torch.cat(ys)]
    return out


def _synthetic_shape(cfg: Any) -> tuple[int, int]:
    """(image_size, num_classes) of the synthetic set: 32 and 10 unless given."""
    size, classes = getattr(cfg, "image_size", None), getattr(cfg, "num_classes", None)
    return int(size or 32), int(classes or 10)


def _imagenet(cfg: Any, root: Path, kw: dict[str, Any]) -> FolderData:
    from torchvision import datasets
    from torchvision import transforms as T

    size = int(conf_value(cfg, "image_size"))
    tail = [T.ToTensor(), T.Normalize(*_STATS["imagenet"])]
    val_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *tail])
    aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail]
    train_tf = T.Compose(aug) if conf_value(cfg, "augment") else val_tf

    def scan() -> tuple[Any, Any]:  # one scan of the folders per process
        return (
            datasets.ImageFolder(str(root / "train"), transform=train_tf),
            datasets.ImageFolder(str(root / "val"), transform=val_tf),
        )

    try:  # FileNotFoundError: no folder, no class folders, or no images in them
        train, val = _remember(
            ("imagenet", str(root), size, bool(conf_value(cfg, "augment"))), scan
        )
    except OSError as e:
        layout = "expected root/train/<class>/*.jpg and root/val/<class>/*.jpg"
        raise CsgdError(f"no ImageNet images under dataset.root={root} ({e})", layout) from None
    if val.classes != train.classes:
        raise CsgdError(
            f"{root}/train and {root}/val have different class folders",
            "give both the same <class> subfolders",
        )
    # limit keeps the first N files in ImageFolder's (sorted) order
    n_train = min(len(train), int(conf_value(cfg, "limit", len(train))))
    info = DataInfo("imagenet", len(train.classes), 3, size, n_train, len(val))
    return FolderData(info, cfg, train, val, **kw)


def _channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 NCHW images, summed in chunks
    so that memory stays bounded at ImageNet sizes."""
    c, n = x.shape[1], 0
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for chunk in x.split(64):
        f = chunk.double().div_(255).transpose(0, 1).reshape(c, -1)
        s += f.sum(1)
        ss += f.square().sum(1)
        n += f.shape[1]
    mean = s / n
    var = (ss - n * mean.square()) / max(n - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().tolist()


def build_data(
    cfg: Any,
    *,
    seed: int,
    device: torch.device,
    rank: int | None = None,
    world: int | None = None,
) -> Data:
    """Load dataset `cfg.name` and return rank `rank`'s view of it (by default this
    process's rank and world size under torchrun, else 0 and 1)."""
    if rank is None or world is None:
        rank, world = rank_world()
    name = str(conf_value(cfg, "name"))
    root = Path(str(conf_value(cfg, "root"))).expanduser()
    limit = conf_value(cfg, "limit")
    if limit is not None and int(limit) < 1:
        raise CsgdError(
            f"dataset.limit={limit} is not a positive sample count",
            "set a count >= 1, or null to use every training sample",
        )
    kw = {"seed": seed, "device": torch.device(device), "rank": rank, "world": world}
    if name == "imagenet":
        return _imagenet(cfg, root, kw)
    if name in _FILE_SETS:
        download = bool(conf_value(cfg, "download"))
        arrays = _remember((name, str(root)), lambda: _FILE_SETS[name](name, root, download))
        stats = _STATS[name]
    else:
        if name == "digits":
            key, load = (name,), _load_digits
        elif name == "synthetic":
            sizes = int(conf_value(cfg, "num_train")), int(conf_value(cfg, "num_test"))
            if min(sizes) < 1:
                msg = f"dataset.num_train/num_test={sizes} are not positive"
                raise CsgdError(msg, "set both to at least 1")
            size, classes = _synthetic_shape(cfg)
            if size < 1 or classes < 2:
                msg = f"dataset.image_size={size}/num_classes={classes} are too small"
                raise CsgdError(msg, "set image_size >= 1 and num_classes >= 2")
            key = (name, *sizes, size, classes)
            load = lambda: _synthetic(*sizes, image_size=size, num_classes=classes)  # noqa: E731
        else:
            check_dataset_name(name)
        # no published stats: measure them, with the load
        arrays, stats = _remember(key, lambda: (a := load(), _channel_stats(a[0][:10000])))
    tx, ty, vx, vy = arrays
    n = len(tx) if limit is None else int(limit)
    n_cls = _synthetic_shape(cfg)[1] if name == "synthetic" else _TENSOR_SETS[name][0]
    info = DataInfo(name, n_cls, tx.shape[1], tx.shape[-1], len(tx[:n]), len(vx))
    return TensorData(info, cfg, (tx[:n], ty[:n], vx, vy), stats, *_TENSOR_SETS[name][1:], **kw)
