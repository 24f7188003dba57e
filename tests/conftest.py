"""Data fixtures: CIFAR-10/100 written in the original python-pickle format."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def _absl_writes_to_the_real_stderr() -> None:
    """absl-py (imported by ``openvino``, here at collection) makes its logging handler on
    ``sys.stderr`` as it is then: pytest's capture file. That handler's ``close()`` closes
    its stream unless it is ``sys.stderr`` at that moment, and the first in-process
    Hydra job closes every handler of the process (``logging.config.dictConfig``). In a
    test under ``capsys`` that closed pytest's capture file, and every later test of the
    process (an xdist worker) failed with "I/O operation on closed file". Bound to
    ``sys.__stderr__``, which absl never closes."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    if sys.__stderr__ is not None:
        absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


_absl_writes_to_the_real_stderr()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per csgd process it starts): two workers on two cores,
    # each spinning two OpenMP threads, mostly wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A tiny ResNet-20 on 256 digits: CLI runs that finish in seconds.
TINY_DIGITS = [
    "model=resnet20",
    "+model.kwargs.widths=[4,8,8,4,4,4,8,8,8,8,8,8]",
    "dataset=digits",
    "dataset.limit=256",
    "dataset.batch_size=16",
    "device=cpu",
    "eval.latency_iters=1",
    "eval.latency_batch=8",
]
# A C-SGD schedule of an epoch or two cannot reach the merge tolerance: `csgd train` and
# `csgd run` refuse it in their preflight (the chi forecast) unless told to go on anyway.
FORCE = "prune.force=true"


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as the original CIFAR pickles do.

    So b"data" loads as "data" under encoding="latin1" (what torchvision uses) and as
    b"data" under encoding="bytes" (what the CIFAR web page's loader uses)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


@dataclass
class CifarFiles:
    """What write_cifar wrote: pixels as NCHW uint8 arrays, labels, file MD5s."""

    root: Path
    kind: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    md5: dict[str, str]


def _dump(path: Path, obj: dict) -> str:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(
    root: Path | str,
    kind: str = "cifar10",
    n_train: int = 50,
    n_test: int = 20,
    seed: int = 0,
) -> CifarFiles:
    """Write a small CIFAR-10/100 in the original layout and format under `root`.

    Rows of b"data" are N x 3072 uint8, channel-planar (R, G, B planes), row-major,
    i.e. exactly `images.reshape(N, 3072)` for NCHW images."""
    rng = np.random.default_rng(seed)
    classes = 10 if kind == "cifar10" else 100
    xs = [rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (n_train, n_test)]
    ys = [rng.integers(0, classes, n).astype(np.int64) for n in (n_train, n_test)]
    root = Path(root)
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def entry(x: np.ndarray, y: np.ndarray, label: str) -> dict:
        names = [f"img_{i:05d}.png".encode() for i in range(len(y))]
        d = {b"batch_label": label.encode(), b"data": x.reshape(len(x), 3072)}
        if kind == "cifar10":
            return {**d, b"labels": y.tolist(), b"filenames": names}
        return {
            **d,
            b"fine_labels": y.tolist(),
            b"coarse_labels": (y // 5).tolist(),
            b"filenames": names,
        }

    md5: dict[str, str] = {}
    if kind == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            batch = entry(xs[0][part], ys[0][part], f"training batch {i} of 5")
            md5[f"data_batch_{i}"] = _dump(folder / f"data_batch_{i}", batch)
        md5["test_batch"] = _dump(
            folder / "test_batch", entry(xs[1], ys[1], "testing batch 1 of 1")
        )
        meta = {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": 10000,
            b"num_vis": 3072,
        }
        md5["batches.meta"] = _dump(folder / "batches.meta", meta)
    else:
        md5["train"] = _dump(folder / "train", entry(xs[0], ys[0], "training batch 1 of 1"))
        md5["test"] = _dump(folder / "test", entry(xs[1], ys[1], "testing batch 1 of 1"))
        meta = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        md5["meta"] = _dump(folder / "meta", meta)
    return CifarFiles(root, kind, xs[0], ys[0], xs[1], ys[1], md5)


def patch_cifar_md5(monkeypatch: pytest.MonkeyPatch, files: CifarFiles) -> None:
    """Point torchvision's expected checksums at the files we wrote.

    torchvision's CIFAR classes verify every file against the MD5 of the real dataset;
    a synthetic fixture cannot match those, so we swap in the MD5s of what we wrote.
    The check itself still runs (a corrupted file would still be rejected)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if files.kind == "cifar10" else CIFAR100
    monkeypatch.setattr(cls, "train_list", [[f, files.md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, files.md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": files.md5[cls.meta["filename"]]})


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: cifar_root(kind="cifar10", n_train=50, n_test=20, patch_md5=True) ->
    CifarFiles written under a temporary root; with patch_md5, torchvision's expected
    checksums are patched (for this test only) to match the files."""

    def make(
        kind: str = "cifar10",
        n_train: int = 50,
        n_test: int = 20,
        patch_md5: bool = True,
    ) -> CifarFiles:
        files = write_cifar(tmp_path / "data", kind, n_train, n_test)
        if patch_md5:
            patch_cifar_md5(monkeypatch, files)
        return files

    return make


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ``base/last.pt`` is the tiny ResNet-20 on digits after one epoch of
    ``csgd pretrain`` (run in this process: a subprocess would import torch again)."""
    from csgd_cli.runner import cli

    d = tmp_path_factory.mktemp("tiny_base")
    fast = ["schedule.epochs=1", "pretrain.epochs=1", "schedule.log_every=0"]
    cli.main(["pretrain", *TINY_DIGITS, *fast, f"hydra.run.dir={d / 'base'}"])
    return d


def _loggers() -> list[logging.Logger]:
    found = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger(), *(lg for lg in found if isinstance(lg, logging.Logger))]


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """An in-process ``csgd`` run lets Hydra configure logging for the whole process, with
    handlers on this test's captured streams (closed when the test ends): put every
    logger back as it was, so no later test of this worker writes to a closed stream."""
    saved = {id(lg): (list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in _loggers()}
    yield
    for lg in _loggers():
        handlers, level, propagate, disabled = saved.get(id(lg), ([], logging.NOTSET, True, False))
        for h in list(lg.handlers):
            if h not in handlers and not type(h).__module__.startswith("_pytest"):
                lg.removeHandler(h)
        if id(lg) in saved:
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
