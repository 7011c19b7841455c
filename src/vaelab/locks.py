"""One writer per folder: the lock vaelab holds on every run folder it writes.

A second process that tries to write the same folder is refused at once with one line that
names the holder ("runs/vae is in use by pid 4242 on node-3"). The lock is ``filelock``'s
``FileLock`` (an OS lock, ``flock`` on Linux) on ``FOLDER/.vaelab.lock``, so it dies with its
holder: a lock left by a killed process is simply taken over, never waited for. The holder's
pid and host are written beside it, to ``FOLDER/.vaelab.lock.json``, for the message. Both
files are removed on release (only a killed holder leaves them), so a folder that vaelab was
refused, or has finished writing, holds no trace of the lock. (Removing a lock file has one
known race: a contender that opened the old file in the microseconds before its removal may
lock it while a third process locks a new one; vaelab's writers are people starting runs, for
whom this does not arise.)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

import filelock

from vaelab.errors import VaelabError
from vaelab.io import atomic_write_json, make_folder

LOCK_FILE = ".vaelab.lock"
HOLDER_FILE = ".vaelab.lock.json"
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)


class FolderInUse(VaelabError):
    """Another process holds the folder's lock (CLI exit code 2)."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder, for the life of one writer.

    ``acquire()`` creates the folder if needed and raises ``FolderInUse`` if another process
    holds it; ``release()`` lets it go and, if ``acquire`` created the folder and nothing else
    was written into it, removes the folder again (a refused start leaves nothing behind).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._lock: filelock.BaseFileLock | None = None
        self._created = False
        self._created_parents: list[Path] = []  # made on the way to folder, nearest first

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> FolderLock:
        if self.held:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            what = "a file" if self.folder.is_file() else "something other than a folder"
            raise VaelabError(f"{self.folder} is {what}, not a folder")
        self._created = not self.folder.exists()
        self._created_parents = []
        parent = self.folder.absolute().parent
        while not parent.exists() and parent != parent.parent:
            self._created_parents.append(parent)
            parent = parent.parent
        try:
            make_folder(self.folder)
        except OSError as e:
            raise VaelabError(e.strerror or str(e)) from None
        lock = filelock.FileLock(str(self.folder / LOCK_FILE), timeout=0,
                                 thread_local=False, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            self._forget_created()
            raise FolderInUse(f"{self.folder} is in use by {holder_of(self.folder)}: wait for "
                              "it to finish, or write elsewhere") from None
        self._lock = lock
        atomic_write_json(self.folder / HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self

    def release(self) -> None:
        if not self.held:
            return
        try:
            (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        finally:
            assert self._lock is not None
            self._lock.release()
            self._lock = None
            try:  # a folder that is let go keeps no trace of the lock
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            self._forget_created()

    def _forget_created(self) -> None:
        """Remove a folder this lock created if it holds nothing but the lock's files, and
        the parent folders it created on the way that are left empty."""
        if not self._created:
            return
        self._created = False
        try:
            if {p.name for p in self.folder.iterdir()} <= set(LOCK_FILES):
                for name in LOCK_FILES:
                    (self.folder / name).unlink(missing_ok=True)
                self.folder.rmdir()
            for parent in self._created_parents:
                parent.rmdir()  # OSError once one is not empty: the rest stay too
        except OSError:
            pass

    def keep(self) -> None:
        """The folder now holds the writer's work: ``release`` leaves it in place."""
        self._created = False
        self._created_parents = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def holder_of(folder: str | os.PathLike) -> str:
    """"pid N on HOST" from the holder file, or "another process" if it cannot be read."""
    try:
        info = json.loads((Path(folder) / HOLDER_FILE).read_text())
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_lock_file(path: Path) -> bool:
    """The lock, its holder file, or the holder file while it is being written (the atomic
    write's ``.vaelab.lock.json.*.tmp``, which another process may see for an instant)."""
    name = path.name
    return name in LOCK_FILES or (name.startswith(f".{HOLDER_FILE}.") and name.endswith(".tmp"))


def check_output_folder(out: Path, marker: str, what: str) -> None:
    """``out`` is new, empty (but for lock files), or ``what``'s folder (it holds ``marker``);
    anything else is a ConfigError, before anything is written there."""
    from vaelab.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.exists() and not (out / marker).exists() \
            and any(not is_lock_file(p) for p in out.iterdir()):
        raise ConfigError(f"{out} holds files but no {marker}: not {what} folder; "
                          "give a new or empty --out")
