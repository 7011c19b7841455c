"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target.

A reader sees the old file or the new one, never half of either; a failed write (a full disk,
a kill) leaves the previous file untouched and removes the temporary.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically."""
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 would ignore the umask
    except OSError as e:
        raise write_error(e, path) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    _fsync_dir(path.parent)


def make_folder(folder: str | os.PathLike) -> None:
    """``mkdir -p folder``; a failure is an OSError (same errno) naming the folder that refused.

    A kernel file system such as /proc refuses a new entry with ENOENT ("No such file or
    directory") although the parent plainly exists; that is reported as what it is, a folder
    that cannot be written: "cannot create /proc/x: /proc cannot be written".
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return
    except OSError as e:
        error = e
    above = folder.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        why = f"{above} is a file, not a folder"
    elif error.errno == errno.ENOENT:
        why = f"{above} cannot be written (it takes no new folders)"
    elif folder.exists() and not folder.is_dir():
        why = f"{folder} is a file, not a folder"
    else:
        why = f"{above} cannot be written ({error.strerror or error})"
    raise OSError(error.errno, f"cannot create {folder}: {why}")


def process_umask() -> int:
    """The process's file-mode creation mask, read without changing it (Linux: from
    /proc/self/status; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(e: OSError, path: str | os.PathLike, *, what: str = "",
                kept: str = "") -> OSError:
    """``e`` (a failed write of ``path``) as an OSError whose message says what happened.

    A full disk raised from ``write()`` names no file; this reads, e.g., "cannot write
    run/metrics.jsonl: no space left on device; run/metrics.jsonl is left as it was". The errno
    is kept (``OSError(errno, ...)`` gives back ``PermissionError`` and the like), so callers can
    still test for it; ``reason`` holds the bare cause, for a caller that re-describes it.
    """
    reason = getattr(e, "reason", None) or (e.strerror or str(e) or type(e).__name__)
    reason = reason.rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    message = f"cannot write {what or path}: {reason}; {kept or f'{path} is left as it was'}"
    out = OSError(e.errno, message) if e.errno is not None else OSError(message)
    out.reason = reason  # type: ignore[attr-defined]
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def console(stderr: bool = False, file: Any = None) -> Any:
    """A rich console for vaelab's output. On a terminal it fits the terminal; into a file or a
    pipe rich would cut every table to 80 columns ("reconstr…"), so there lines are as long as
    their content instead."""
    from rich.console import Console

    out = Console(stderr=stderr, file=file, highlight=False)
    if not out.is_terminal:
        out = Console(stderr=stderr, file=file, highlight=False, width=NO_TERMINAL_WIDTH)
    return out


NO_TERMINAL_WIDTH = 10_000  # columns: no table or line vaelab prints comes near it
