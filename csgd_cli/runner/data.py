"""Batches with a seeded, resumable, shardable order (the loaders are ``datasets.py``).

Small datasets live on the training device as uint8 NCHW tensors and are augmented
batch-wise there; ImageNet goes through ImageFolder + DataLoader with the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate

from ..common.config import DatasetConf
from ..common.errors import CsgdError

_MASK64 = (1 << 64) - 1
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


def conf_value(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key; when it is missing or null, the structured config's default
    (``config.DatasetConf``, the one source of defaults), else ``default``."""
    value = getattr(cfg, key, None)
    if value is None:
        value = getattr(_DEFAULTS, key, None)
    return default if value is None else value


def mix_seed(*parts: int) -> int:
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
    """uint8 NCHW -> (x/255 - mean)/std in torch's default float dtype (float32 unless
    set otherwise), as one multiply-subtract pass."""
    dt = torch.get_default_dtype()
    m = torch.as_tensor(mean, dtype=dt, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=dt, device=x.device).view(1, -1, 1, 1)
    return x.to(dt).mul_(1.0 / (255.0 * s)).sub_(m / s)


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
        self.batch_size = int(conf_value(cfg, "batch_size"))
        self.eval_batch_size = int(conf_value(cfg, "eval_batch_size"))
        self.augment = bool(conf_value(cfg, "augment"))
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
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
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
            yield order[step * bs : (step + 1) * bs], mix_seed(self.seed, epoch, step, 0), mine

    def test_shard(self) -> tuple[int, int]:
        """[start, stop) of the test split this rank evaluates."""
        n = self.info.num_test
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def nonfinite_samples(self, epoch: int, step: int, x: Tensor | None = None) -> list[int]:
        """Training-set indices of this rank's samples at ``step`` of ``epoch`` whose input
        holds a NaN/inf (``x``: that step's inputs; made again when None)."""
        if x is None:
            x = next(iter(self.train_batches(epoch, step)))[0]
        batch, _, mine = next(self._plan(epoch, step))
        rows = (~torch.isfinite(x.flatten(1)).all(1)).nonzero().flatten().cpu()
        return batch[mine][rows].tolist()

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
        workers = int(conf_value(cfg, "num_workers"))
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
