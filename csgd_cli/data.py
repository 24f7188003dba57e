"""Datasets with a seeded, resumable, shardable batch order.

Small datasets live on the training device as uint8 NCHW tensors and are augmented
batch-wise there; ImageNet goes through ImageFolder + DataLoader with the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate

from csgd_cli.config import DatasetConf
from csgd_cli.distributed import rank_world
from csgd_cli.errors import CsgdError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "synthetic", "imagenet")
# per-channel mean/std in [0, 1] units
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# (classes, crop padding, horizontal flip); digits are not mirror-symmetric
_TENSOR_SETS = {
    "cifar10": (10, 4, True),
    "cifar100": (100, 4, True),
    "digits": (10, 1, False),
    "synthetic": (10, 4, True),
}
_SYNTH_SEED = 20190613  # fixed, so synthetic train and test share one distribution
_MASK64 = (1 << 64) - 1
# what torchvision's CIFAR raises when offline (URLError is an OSError) or on bad files
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError)
Batch = tuple[Tensor, Tensor]
_DEFAULTS = DatasetConf()


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_test: int


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key; when it is missing or null, the structured config's default
    (``config.DatasetConf``, the one source of defaults), else ``default``."""
    value = getattr(cfg, key, None)
    if value is None:
        value = getattr(_DEFAULTS, key, None)
    return default if value is None else value


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise CsgdError(f"unknown dataset '{name}'", f"choose dataset=<{'|'.join(DATASETS)}>")


def _mix(*parts: int) -> int:
    """A 64-bit seed from integers; SeedSequence decorrelates neighbouring tuples."""
    seq = np.random.SeedSequence([p & _MASK64 for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def augment_batch(
    x: Tensor,
    pad: int,
    flip: bool,
    generator: torch.Generator,
    first: int = 0,
    total: int | None = None,
) -> Tensor:
    """Zero-padded random crop (+ horizontal flip) of a uint8 NCHW batch, one gather.

    ``x`` may be rows ``first ...`` of a batch of ``total`` samples (one rank's part):
    the draws are made for the whole batch, so every sample gets the crop and flip it
    gets in the single-process batch."""
    n, c, h, w = x.shape
    dev, span = x.device, 2 * pad + 1
    total = n if total is None else total
    rows = slice(first, first + n)
    oy = torch.randint(0, span, (total, 1, 1), generator=generator, device=dev)[rows]
    ox = torch.randint(0, span, (total, 1, 1), generator=generator, device=dev)[rows]
    cols = torch.arange(w, device=dev).expand(n, 1, w)
    if flip:  # a flip is reading the crop's columns backwards: no extra pass
        flipped = torch.rand(total, 1, 1, generator=generator, device=dev)[rows] < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    rows = oy + torch.arange(h, device=dev).view(1, h, 1)
    idx = (rows * (w + 2 * pad) + ox + cols).view(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x, (pad, pad, pad, pad)).view(n, c, -1)
    return padded.gather(2, idx).view(n, c, h, w)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 NCHW -> float32 (x/255 - mean)/std, as one multiply-subtract pass."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.float().mul_(1.0 / (255.0 * s)).sub_(m / s)


class Data:
    """Batches for rank `rank` of `world`; subclasses turn index lists into tensors.

    ``batch_size`` is the global batch: at every step the epoch's single-process batch
    is cut into `world` contiguous parts and rank r takes part r, augmented as in one
    process (per-step seeds). The test split is cut into `world` contiguous shards."""

    def __init__(
        self,
        info: DataInfo,
        cfg: Any,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.info, self.seed, self.device = info, seed, device
        self.rank, self.world = rank, world
        self.batch_size = int(_opt(cfg, "batch_size"))
        self.eval_batch_size = int(_opt(cfg, "eval_batch_size"))
        self.augment = bool(_opt(cfg, "augment"))
        bs = min(self.batch_size, info.num_train)  # fewer samples than a batch: one batch
        if bs % world:
            raise CsgdError(
                f"dataset.batch_size={self.batch_size} (the global batch"
                f"{f' of {bs} samples' if bs < self.batch_size else ''}) does not divide among"
                f" {world} processes",
                f"pass a dataset.batch_size that is a multiple of {world}, or run {world}"
                " processes that divide it",
            )

    def epoch_indices(self, epoch: int) -> Tensor:
        """The epoch's training order: the single-process order, on every rank."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.info.num_train, generator=g)

    def steps_per_epoch(self) -> int:
        n = self.info.num_train
        return n // self.batch_size if n >= self.batch_size else int(n > 0)

    def _plan(self, epoch: int, start_step: int) -> Iterator[tuple[Tensor, int, slice]]:
        """(the step's global batch, its augmentation seed, this rank's rows of it) per
        step; skipped steps cost nothing."""
        order = self.epoch_indices(epoch)
        bs = min(self.batch_size, len(order))
        part = bs // self.world
        mine = slice(self.rank * part, (self.rank + 1) * part)
        for step in range(start_step, self.steps_per_epoch()):
            # the seed's last part was the rank once; 0 keeps one-process runs as they were
            yield order[step * bs : (step + 1) * bs], _mix(self.seed, epoch, step, 0), mine

    def test_shard(self) -> tuple[int, int]:
        """[start, stop) of the test split this rank evaluates."""
        n = self.info.num_test
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

    def test_batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def sample_batch(self, n: int) -> Batch:
        raise NotImplementedError


class TensorData(Data):
    """The whole dataset as uint8 tensors on the device, augmented batch-wise there."""

    def __init__(
        self,
        info: DataInfo,
        cfg: Any,
        arrays: Sequence[Tensor],
        stats: Sequence[Sequence[float]],
        pad: int,
        flip: bool,
        **kw: Any,
    ) -> None:
        super().__init__(info, cfg, **kw)
        self.train_x, self.train_y, self.test_x, self.test_y = (a.to(self.device) for a in arrays)
        self.mean, self.std = (torch.tensor(s, device=self.device) for s in stats)
        self.pad, self.flip = pad, flip

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for batch, aug_seed, mine in self._plan(epoch, start_step):
            idx = batch[mine].to(self.device)
            x = self.train_x.index_select(0, idx)  # far faster than x[idx] on CPU
            if self.augment:
                g = torch.Generator(device=self.device).manual_seed(aug_seed)
                x = augment_batch(x, self.pad, self.flip, g, mine.start, len(batch))
            yield normalize(x, self.mean, self.std), self.train_y.index_select(0, idx)

    def test_batches(self) -> Iterator[Batch]:
        start, stop = self.test_shard()
        for i in range(start, stop, self.eval_batch_size):
            yield self._test_slice(i, min(i + self.eval_batch_size, stop))

    def sample_batch(self, n: int) -> Batch:
        return self._test_slice(0, n)

    def _test_slice(self, a: int, b: int) -> Batch:
        return normalize(self.test_x[a:b], self.mean, self.std), self.test_y[a:b]


class _Seeded(torch.utils.data.Dataset):
    """Items keyed (index, seed): PIL transforms draw from torch's global CPU RNG, so
    each image is transformed under its own seed; the caller's RNG state is restored."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __getitem__(self, key: tuple[int, int]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key[1])
            return self.ds[key[0]]


class FolderData(Data):
    """ImageNet-style folders, decoded image by image in DataLoader workers."""

    def __init__(self, info: DataInfo, cfg: Any, train: Any, val: Any, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        self.train, self.val = _Seeded(train), val
        workers = int(_opt(cfg, "num_workers"))
        self.loader_kw = {"num_workers": workers, "pin_memory": self.device.type == "cuda"}

    def _to_device(self, batches: Any) -> Iterator[Batch]:
        for x, y in batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = [  # per-sample seeds by position in the global batch, as in one process
            [(int(idx[j]), (s + j) & _MASK64) for j in range(mine.start, mine.stop)]
            for idx, s, mine in self._plan(epoch, start_step)
        ]
        return self._to_device(DataLoader(self.train, batch_sampler=plan, **self.loader_kw))

    def test_batches(self) -> Iterator[Batch]:
        start, stop = self.test_shard()
        val = self.val if self.world == 1 else Subset(self.val, range(start, stop))
        return self._to_device(DataLoader(val, self.eval_batch_size, **self.loader_kw))

    def sample_batch(self, n: int) -> Batch:
        items = [self.val[i] for i in range(min(n, self.info.num_test))]
        return next(self._to_device([default_collate(items)]))


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
            gb = torch.Generator().manual_seed(_mix(_SYNTH_SEED, split, block))
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

    size = int(_opt(cfg, "image_size"))
    tail = [T.ToTensor(), T.Normalize(*_STATS["imagenet"])]
    val_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *tail])
    aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail]
    train_tf = T.Compose(aug) if _opt(cfg, "augment") else val_tf
    try:  # FileNotFoundError: no folder, no class folders, or no images in them
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except OSError as e:
        layout = "expected root/train/<class>/*.jpg and root/val/<class>/*.jpg"
        raise CsgdError(f"no ImageNet images under dataset.root={root} ({e})", layout) from None
    if val.classes != train.classes:
        raise CsgdError(
            f"{root}/train and {root}/val have different class folders",
            "give both the same <class> subfolders",
        )
    # limit keeps the first N files in ImageFolder's (sorted) order
    n_train = min(len(train), int(_opt(cfg, "limit", len(train))))
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
    name = str(_opt(cfg, "name"))
    root = Path(str(_opt(cfg, "root"))).expanduser()
    limit = _opt(cfg, "limit")
    if limit is not None and int(limit) < 1:
        raise CsgdError(
            f"dataset.limit={limit} is not a positive sample count",
            "set a count >= 1, or null to use every training sample",
        )
    kw = {"seed": seed, "device": torch.device(device), "rank": rank, "world": world}
    if name == "imagenet":
        return _imagenet(cfg, root, kw)
    if name in ("cifar10", "cifar100"):
        arrays = _load_cifar(name, root, bool(_opt(cfg, "download")))
        stats = _STATS[name]
    elif name == "digits":
        arrays = _load_digits()
    elif name == "synthetic":
        sizes = int(_opt(cfg, "num_train")), int(_opt(cfg, "num_test"))
        if min(sizes) < 1:
            msg = f"dataset.num_train/num_test={sizes} are not positive"
            raise CsgdError(msg, "set both to at least 1")
        size, classes = _synthetic_shape(cfg)
        if size < 1 or classes < 2:
            msg = f"dataset.image_size={size}/num_classes={classes} are too small"
            raise CsgdError(msg, "set image_size >= 1 and num_classes >= 2")
        arrays = _synthetic(*sizes, image_size=size, num_classes=classes)
    else:
        check_dataset_name(name)
    if name in ("digits", "synthetic"):
        stats = _channel_stats(arrays[0][:10000])  # no published stats: measure them
    tx, ty, vx, vy = arrays
    n = len(tx) if limit is None else int(limit)
    n_cls = _synthetic_shape(cfg)[1] if name == "synthetic" else _TENSOR_SETS[name][0]
    info = DataInfo(name, n_cls, tx.shape[1], tx.shape[-1], len(tx[:n]), len(vx))
    return TensorData(info, cfg, (tx[:n], ty[:n], vx, vy), stats, *_TENSOR_SETS[name][1:], **kw)
