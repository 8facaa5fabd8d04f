"""One run per output folder: an exclusive lock file naming its owner, taken before any heavy work.

Two runs writing one folder would each append every row (or interleave checkpoints) and both exit 0, with one
config describing both. :class:`RunLock` creates ``LOCK_NAME`` in the folder exclusively; a second run refuses
in one line naming the owner. Creating the lock is also the first write into the folder, so a folder that cannot
be written is reported here, before a model is loaded.

The lock file is written whole under a temporary name and then hard-linked into place: ``link`` fails when the
name exists, atomically, on local filesystems and on NFS (where ``O_EXCL`` was not reliable before NFSv3), and a
reader never sees a half-written owner. A lock whose owner is a dead process on this host (a kill, an out-of-
memory kill) is stale and taken over; a lock from another host cannot be checked from here, so it is refused with
the way out: delete the file once that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from diffmem.common.errors import DiffmemError
from diffmem.common.results import pid_alive

LOCK_NAME = ".diffmem.lock"


class RunLockedError(DiffmemError, RuntimeError):
    """The output folder is another live run's; str() is one line."""


class OutputFolderError(DiffmemError, OSError):
    """The output folder cannot be created or written; str() is one line."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in (...) may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    """Whether pid runs on this host and, where its start time was recorded, is the same process."""
    if not pid_alive(pid):
        return False
    now = _start_time(pid)
    return start is None or now is None or now == start


def writable_folder(folder: str | Path, flag: str) -> Path:
    """Create folder (and its parents) or raise OutputFolderError naming the flag and the reason."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{flag} {folder}: is a file; expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"{flag} {folder}: cannot create the output folder ({exc.strerror or exc})") from None
    return folder


class RunLock:
    """An exclusive lock on an output folder for the life of a run: ``with RunLock(folder, "--out"):``."""

    def __init__(self, folder: str | Path, flag: str, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.created = False  # the folder was made for this run: removed again if the run leaves it empty
        self.flag = flag
        self.path = self.folder / name
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; RunLockedError if a live run holds it."""
        self.created = not self.folder.exists()
        writable_folder(self.folder, self.flag)
        tmp = self.path.with_name(f"{self.path.name}.{self.owner['pid']}.tmp")
        try:
            try:
                tmp.write_text(json.dumps(self.owner))
            except OSError as exc:
                raise OutputFolderError(f"{self.flag} {self.folder}: cannot write in the output folder "
                                        f"({exc.strerror or exc})") from None
            for _ in range(3):  # a stale lock removed by us, then taken by a third run first: look again
                try:
                    self._create(tmp)
                    self.held = True
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise RunLockedError(f"{self.flag} {self.folder}: could not take the run lock {self.path}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._remove_if_made_empty()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _create(self, tmp: Path) -> None:
        """The lock file, created exclusively (FileExistsError when it exists)."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise OutputFolderError(f"{self.flag} {self.folder}: cannot write in the output folder "
                                        f"({exc.strerror or exc})") from None
            # A filesystem without hard links (some FUSE and SMB mounts): O_EXCL, which they do honour.
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise
            except OSError as exc2:
                raise OutputFolderError(f"{self.flag} {self.folder}: cannot write in the output folder "
                                        f"({exc2.strerror or exc2})") from None
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())

    def _remove_if_made_empty(self) -> None:
        # A run refused before its first result leaves no empty folder behind (nothing to clean up by hand).
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            owner, pid, host = {}, None, None  # not written by RunLock (it writes whole files): stale
        if pid is not None and host != socket.gethostname():
            raise RunLockedError(
                f"{self.flag} {self.folder} is in use by pid {pid} on {host} since {owner.get('since')}; run "
                f"one job per folder, or delete {self.path} if that run is dead (another host's process cannot be "
                f"checked from here)")
        if pid is not None and _alive(pid, owner.get("start")):
            raise RunLockedError(
                f"{self.flag} {self.folder} is in use by another run (pid {pid}, since {owner.get('since')}); "
                f"wait for it, or write to another folder")
        # Renamed away first, so two runs taking over the same stale lock cannot both remove a fresh one.
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
            aside.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self._remove_if_made_empty()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_folder(folder: str | Path, flag: str, name: str = LOCK_NAME):
    """The run's lock on the main process of a launch (RANK 0, or no launcher); a no-op on the other processes,
    which write only into what the main process holds."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return RunLock(folder, flag, name)
