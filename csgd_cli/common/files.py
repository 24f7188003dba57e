"""Small file and text helpers every module shares: atomic writes, JSON lines, tables.

Every write that does not fit (disk full, quota, ``ulimit -f``) raises the one-line
``errors.disk_full`` and leaves the file as it was: no temporary file, no partial line."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import disk_full, is_disk_full

_WRITES = [True]  # False on the other ranks of csgd's own torchrun job (``set_writes``)


def set_writes(enabled: bool) -> None:
    """The CLI turns writes off on every rank but 0 of its own distributed job (a rank
    that reads a file next waits at a barrier first). A library call writes what its
    caller asks: no environment variable changes that."""
    _WRITES[0] = enabled


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, rename: a kill or a full disk
    mid-write leaves the previous file intact (the temporary file is removed)."""
    path = Path(path)
    if not _WRITES[0]:
        return path
    blob = data.encode() if isinstance(data, str) else data
    with atomic_path(path, len(blob)) as tmp:
        tmp.write_bytes(blob)
    return path


@contextmanager
def atomic_path(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """The same write for a writer that takes a file name (an ONNX exporter, a
    quantizer): the block writes the temporary path it is given, which is fsynced and
    renamed onto ``path`` when the block ends, and removed whatever happens. ``need``:
    the bytes the write takes, named if the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: a stray one is known
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, e, need) from e  # the old file is untouched
        raise
    finally:
        tmp.unlink(missing_ok=True)


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to a JSON-lines file. A write that does not fit is
    undone (the file is cut back to its old size), and a last line cut short by a killed
    writer is ended first, so that it cannot swallow the new record."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # unbuffered: no retry on close
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:  # a write may be short just before the limit; the next one fails
                view = view[os.write(fd, view) :]
        except OSError as e:
            os.ftruncate(fd, size)
            if is_disk_full(e):
                raise disk_full(path, e, len(data)) from e
            raise
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """The parsed file, or None when it is missing or not JSON."""
    return read_json_checked(path)[0]


def read_json_checked(path: str | Path) -> tuple[Any, str | None]:
    """(the parsed file, None); (None, None) when it is missing; (None, what is wrong)
    when it is there but unreadable or not JSON."""
    p = Path(path)
    if not p.exists():
        return None, None
    try:
        return json.loads(p.read_bytes()), None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"{p.name} is damaged ({type(e).__name__}: {str(e).splitlines()[0]})"


def read_jsonl(path: str | Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines file. A line that is not one JSON object
    (the last one cut short by a killed writer, or a damaged one) is skipped, and
    ``skipped`` gets a note naming its line number."""
    p = Path(path)
    if not p.is_file():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":  # the file ends with a newline, as it should
        lines.pop()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif skipped is not None:
            cut = n == len(lines) and not raw.endswith(b"\n")
            why = "cut short (its writer was killed mid-line)" if cut else "not a JSON record"
            skipped.append(f"{p} line {n} is {why}: skipped")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A Markdown table (readable as plain text too), columns padded to their widths."""
    # a list, not arguments: with no rows (a report of unfinished runs) the headers count
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        cells = (
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        )
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)
    )
    return "\n".join([line(headers), sep + "|", *(line(r) for r in rows)])


def in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (not in joblib workers)."""
    return threading.current_thread() is threading.main_thread()
