"""User-facing errors and the disk-full message (``csgd_cli.common.errors``)."""

from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path

import pytest

from csgd_cli.common import errors
from csgd_cli.common.errors import (
    CsgdError,
    NotConverged,
    Preempted,
    disk_full,
    is_disk_full,
    raise_preempted,
)

Usage = namedtuple("Usage", "total used free")


def test_csgd_error_joins_problem_and_fix_on_one_line() -> None:
    e = CsgdError("ckpt=x.pt is missing\n(looked in /tmp)", "pass an existing file")
    assert str(e) == "ckpt=x.pt is missing (looked in /tmp); pass an existing file"
    assert str(CsgdError("only a problem")) == "only a problem"
    assert e.exit_code == 2


def test_exit_codes_of_the_subclasses() -> None:
    assert issubclass(NotConverged, CsgdError) and issubclass(Preempted, CsgdError)
    assert NotConverged("chi too large").exit_code == 1  # `csgd check`: not a usage error
    assert Preempted("stopped").exit_code == 128 + 15  # what schedulers expect of SIGTERM


def test_raise_preempted_takes_a_signal_handlers_arguments() -> None:
    with pytest.raises(Preempted, match="SIGTERM") as e:
        raise_preempted(15, None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EFBIG, "File too large"), True),  # ulimit -f
        (OSError(errno.EACCES, "Permission denied"), False),
        (OSError("no errno at all"), False),
        (ValueError(errno.ENOSPC), False),  # not an OSError, whatever its argument
    ],
)
def test_is_disk_full(exc: BaseException, full: bool) -> None:
    assert is_disk_full(exc) is full


@pytest.mark.parametrize(
    ("need", "said"),
    [
        (500, "it needs 500 bytes"),
        (2048, "it needs 2.0 KiB"),
        (3 * 1024**2 + 512 * 1024, "it needs 3.5 MiB"),
        (5 * 1024**3, "it needs 5.0 GiB"),
        (2 * 1024**5, "it needs 2048.0 TiB"),  # no unit above TiB
    ],
)
def test_disk_full_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, need: int, said: str
) -> None:
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: Usage(0, 0, 1536))
    e = disk_full(tmp_path / "x.pt", OSError(errno.ENOSPC, "No space left on device"), need)
    assert f"{said}, 1.5 KiB free there" in str(e)


def test_disk_full_names_the_file_the_cause_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Path] = []

    def usage(p: Path) -> Usage:
        asked.append(Path(p))
        return Usage(0, 0, 10 * 1024**2)

    monkeypatch.setattr(errors.shutil, "disk_usage", usage)
    target = tmp_path / "not" / "made" / "yet" / "ck.pt"
    e = disk_full(target, OSError(errno.ENOSPC, "No space left on device"))
    msg = str(e)
    assert asked == [tmp_path]  # the nearest folder that exists is asked for its free space
    assert msg.startswith(f"could not write {target}: disk full or file too large")
    assert "(No space left on device); 10.0 MiB free there;" in msg
    assert "needs" not in msg  # no size given: none said
    assert "ulimit -f" in msg and "resume=true" in msg and "\n" not in msg
    assert isinstance(e, CsgdError) and e.exit_code == 2


def test_disk_full_when_the_free_space_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(p: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(errors.shutil, "disk_usage", broken)
    e = disk_full(tmp_path / "a.json", OSError(errno.EFBIG), 10)
    assert "it needs 10 bytes, free space unknown" in str(e)
    # an OSError without a strerror: its own text names it
    assert f"({OSError(errno.EFBIG)})" in str(e)
