"""Atomic writes, JSON lines and Markdown tables (``csgd_cli.common.files``)."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from csgd_cli.common import files
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.files import (
    append_line,
    atomic_write,
    in_main_thread,
    read_json,
    read_json_checked,
    read_jsonl,
    set_writes,
    table,
    write_json,
)


class _Os:
    """``os`` as ``files`` sees it, with some functions replaced (only for that module)."""

    def __init__(self, **replaced: Any) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _raise(err: int) -> Any:
    def f(*_: Any) -> None:
        raise OSError(err, os.strerror(err))

    return f


# -- atomic_write ---------------------------------------------------------------------------
def test_atomic_write_text_and_bytes_in_new_folders(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "x.txt"
    assert atomic_write(p, "héllo") == p
    assert p.read_bytes() == "héllo".encode()
    atomic_write(p, b"\x00\xff")  # replaces the old content
    assert p.read_bytes() == b"\x00\xff"
    assert sorted(q.name for q in p.parent.iterdir()) == ["x.txt"]  # no temporary file left


def test_no_writes_when_turned_off(tmp_path: Path) -> None:
    set_writes(False)
    try:
        p = atomic_write(tmp_path / "sub" / "x.json", "data")
        write_json(tmp_path / "y.json", {"a": 1})
    finally:
        set_writes(True)
    assert p == tmp_path / "sub" / "x.json"
    assert list(tmp_path.iterdir()) == []  # not even the folder
    atomic_write(p, "now")
    assert p.read_text() == "now"


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_full_disk_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    p = tmp_path / "summary.json"
    p.write_text("old")
    monkeypatch.setattr(files, "os", _Os(**{step: _raise(errno.ENOSPC)}))
    with pytest.raises(CsgdError, match=f"could not write {p}: disk full") as e:
        atomic_write(p, "new content")
    assert "it needs 11 bytes" in str(e.value)  # the size of what did not fit
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["summary.json"]


def test_another_os_error_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "x.txt"
    monkeypatch.setattr(files, "os", _Os(replace=_raise(errno.EACCES)))
    with pytest.raises(PermissionError):
        atomic_write(p, "data")
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed all the same


# -- append_line ----------------------------------------------------------------------------
def test_append_line_adds_one_newline(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    append_line(p, '{"a": 1}')
    append_line(p, '{"a": 2}\n')  # a line that ends with a newline gets no second one
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_append_line_ends_a_cut_line_first(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a": ')  # a writer killed mid-line
    append_line(p, '{"a": 3}')
    assert p.read_text() == '{"a": 1}\n{"a": \n{"a": 3}\n'
    skipped: list[str] = []
    assert read_jsonl(p, skipped) == [{"a": 1}, {"a": 3}]
    assert skipped == [f"{p} line 2 is not a JSON record: skipped"]


def test_append_line_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []

    def short(fd: int, data: Any) -> int:  # at most 3 bytes per call, as near a limit
        n = os.write(fd, bytes(data[:3]))
        sizes.append(n)
        return n

    p = tmp_path / "m.jsonl"
    monkeypatch.setattr(files, "os", _Os(write=short))
    append_line(p, '{"step": 10}')
    assert p.read_text() == '{"step": 10}\n'
    assert len(sizes) == 5  # 13 bytes, 3 at a time


def test_append_line_on_a_full_disk_cuts_the_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n')
    calls = [0]

    def part_then_full(fd: int, data: Any) -> int:  # a few bytes land, then no more fit
        calls[0] += 1
        if calls[0] == 1:
            return os.write(fd, bytes(data[:4]))
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(files, "os", _Os(write=part_then_full))
    with pytest.raises(CsgdError, match=r"disk full or file too large \(File too large\)") as e:
        append_line(p, '{"a": 2}')
    assert "it needs 9 bytes" in str(e.value)
    assert p.read_text() == '{"a": 1}\n'  # the 4 bytes written are undone


def test_append_line_other_errors_are_raised_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text("x\n")
    monkeypatch.setattr(files, "os", _Os(write=_raise(errno.EIO)))
    with pytest.raises(OSError) as e:
        append_line(p, "y")
    assert e.value.errno == errno.EIO and not isinstance(e.value, CsgdError)
    assert p.read_text() == "x\n"


# -- JSON -----------------------------------------------------------------------------------
def test_write_json_then_read_json(tmp_path: Path) -> None:
    obj = {"rows": {"base": {"acc": 91.5}}, "ratio": None, "names": ["a", "b"]}
    p = write_json(tmp_path / "s.json", obj)
    assert p.read_text() == json.dumps(obj, indent=2) + "\n"
    assert read_json(p) == obj


def test_read_json_checked_says_what_is_wrong(tmp_path: Path) -> None:
    assert read_json_checked(tmp_path / "missing.json") == (None, None)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    obj, why = read_json_checked(bad)
    assert obj is None and why is not None
    assert why.startswith("bad.json is damaged (JSONDecodeError: Expecting value")
    bad.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    assert read_json_checked(bad)[1].startswith("bad.json is damaged (UnicodeDecodeError: ")
    folder = tmp_path / "dir.json"
    folder.mkdir()  # there, but not a file
    assert read_json_checked(folder)[1].startswith("dir.json is damaged (IsADirectoryError: ")
    assert read_json(bad) is None and read_json(tmp_path / "missing.json") is None
    assert read_json_checked(write_json(tmp_path / "ok.json", [1, 2])) == ([1, 2], None)


def test_read_json_checked_keeps_a_one_line_reason(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("[1,\n2,\n")
    why = read_json_checked(p)[1]
    assert why is not None and "\n" not in why


# -- read_jsonl -----------------------------------------------------------------------------
def test_read_jsonl_keeps_objects_and_names_what_it_skips(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"a": 1}\n\n   \n[1, 2]\n7\n{bad\n{"a": 2}\n{"a": 3')
    skipped: list[str] = []
    assert read_jsonl(p, skipped) == [{"a": 1}, {"a": 2}]
    assert skipped == [
        f"{p} line 4 is not a JSON record: skipped",  # a list is not a record
        f"{p} line 5 is not a JSON record: skipped",
        f"{p} line 6 is not a JSON record: skipped",
        f"{p} line 8 is cut short (its writer was killed mid-line): skipped",
    ]
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]  # no list: skipped silently


def test_read_jsonl_a_damaged_last_line_that_ends_is_not_cut(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a"\n')
    skipped: list[str] = []
    assert read_jsonl(p, skipped) == [{"a": 1}]
    assert skipped == [f"{p} line 2 is not a JSON record: skipped"]


def test_read_jsonl_of_nothing(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    assert read_jsonl(tmp_path) == []  # a folder
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl(tmp_path / "empty.jsonl", []) == []


# -- table ----------------------------------------------------------------------------------
def test_table_pads_and_aligns() -> None:
    got = table(["name", "n"], [["a", "1"], ["bbbbbb", "22"]], [False, True])
    assert got.splitlines() == [
        "| name   |  n |",
        "|--------|---:|",
        "| a      |  1 |",
        "| bbbbbb | 22 |",
    ]


def test_table_with_no_rows_is_the_header() -> None:
    assert table(["run", "top-1"], [], [False, True]) == "| run | top-1 |\n|-----|------:|"


def test_table_refuses_a_row_of_another_length() -> None:
    with pytest.raises(ValueError):
        table(["a", "b"], [["1", "2", "3"]], [False, False])


def test_in_main_thread() -> None:
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(in_main_thread()))
    t.start()
    t.join()
    assert in_main_thread() and seen == [False]
