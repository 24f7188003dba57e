"""MNIST and Fashion-MNIST from the standard idx files (LeCun's format, ``.gz`` or not).

Offline the four files are read from ``dataset.root`` (as they are, or in torchvision's
``<root>/<Class>/raw`` layout), or from where a system package put them (Debian's
``dataset-fashion-mnist``); online, torchvision downloads them into ``<root>/<Class>/raw``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..common.errors import CsgdError

# idx type codes (the third magic byte) that these sets use, and their numpy types
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}
_FILES = (  # in the order build_data wants them: train x, train y, test x, test y
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class IdxSet:
    label: str  # for messages
    torchvision: str  # torchvision.datasets class: downloads into <root>/<class>/raw
    system_dirs: tuple[str, ...]  # where a package installs the files
    package_hint: str  # how to get the files offline


IDX_SETS = {
    "fashion_mnist": IdxSet(
        "Fashion-MNIST",
        "FashionMNIST",
        ("/usr/share/datasets/fashion-mnist",),
        "apt-get install dataset-fashion-mnist (puts them in /usr/share/datasets/fashion-mnist)",
    ),
    "mnist": IdxSet(
        "MNIST",
        "MNIST",
        (),
        "copy them from a machine with a network (torchvision writes <root>/MNIST/raw)",
    ),
}


def read_idx(path: Path) -> np.ndarray:
    """The array in one idx file (gzip-compressed when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise CsgdError(f"{path} could not be read ({e})", "download or copy it again") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _DTYPES or not 1 <= raw[3] <= 4:
        raise CsgdError(f"{path} is not an idx file (bad magic number)", "download it again")
    ndim, dtype = raw[3], np.dtype(_DTYPES[raw[2]])
    head = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:head], ">u4")) if len(raw) >= head else ()
    if len(shape) != ndim or len(raw) != head + dtype.itemsize * int(np.prod(shape)):
        raise CsgdError(
            f"{path} is truncated or damaged (size does not match its header)",
            "download it again",
        )
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def idx_dirs(name: str, root: Path) -> list[Path]:
    """The folders searched for ``name``'s files, in order."""
    spec = IDX_SETS[name]
    return [root, root / spec.torchvision / "raw", *map(Path, spec.system_dirs)]


def _find(folder: Path) -> list[Path] | None:
    """The four files in ``folder`` (raw preferred to .gz), or None when one is absent."""
    found = []
    for stem in _FILES:
        hits = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found


def _download(name: str, root: Path) -> str | None:
    """Have torchvision download the files; the reason when it could not."""
    from torchvision import datasets

    cls = getattr(datasets, IDX_SETS[name].torchvision)
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def load_idx(name: str, root: Path, download: bool) -> list[Tensor]:
    """[train x (N,1,28,28) uint8, train y int64, test x, test y] of an idx data set."""
    spec, dirs = IDX_SETS[name], idx_dirs(name, root)
    files = next((f for f in map(_find, dirs) if f), None)
    why = ""
    if files is None and download:
        why = _download(name, root) or ""
        files = _find(root / spec.torchvision / "raw")
    if files is None:
        looked = ", ".join(f"{s}[.gz]" for s in _FILES)
        where = ", ".join(map(str, dirs))
        failed = f" (download failed: {why})" if why else ""
        raise CsgdError(
            f"{spec.label} not found: looked for {looked} in {where}{failed}",
            f"{spec.package_hint}, or set dataset.download=true with a network (torchvision"
            f" downloads them into {root / spec.torchvision / 'raw'}), or set dataset.root=<a"
            " folder that holds them>",
        )
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)
    for x, y, fx, fy in ((x_tr, y_tr, *files[:2]), (x_te, y_te, *files[2:])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise CsgdError(
                f"{fx} holds images of shape {x.shape} for {y.shape} labels in {fy}",
                "the images file must be N x H x W and the labels file N long",
            )
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < 10:
            raise CsgdError(f"{fy} holds labels outside 0-9", "download or copy it again")
    out: list[Tensor] = []
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        out += [
            torch.from_numpy(x.astype(np.uint8)).unsqueeze(1),
            torch.from_numpy(y.astype(np.int64)),
        ]
    return out
