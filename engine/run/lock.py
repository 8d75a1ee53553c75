"""One driver per run directory: a lock file held for the whole of ``codelens run``.

Two drivers on the same directory would both run every shard (the manifest would list each twice).
The driver holds ``RUN_DIR/_driver.lock``: an exclusive ``flock`` on the file, plus who holds it
(host, pid, start time) written inside, for the message a second driver gets.

* The kernel releases a ``flock`` when its process dies, so a lock left by a killed driver on the
  same host is detected (the lock is free although the file names a holder) and taken over.
* On a shared file system without working ``flock`` (some NFS set-ups), the written holder is the
  fallback: a holder on this host whose pid is gone is stale and taken over; a holder on another
  host cannot be checked from here, so the message says how to clear the lock by hand.

The file is never deleted (a process that opened the old file could otherwise lock a file nobody
else sees); releasing it empties it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from codelens.engine.errors import RunDirError

log = logging.getLogger(__name__)

LOCK_NAME = "_driver.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(fd: int) -> dict[str, Any] | None:
    """Who the lock file says holds it (None when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started', '?')})"
    )


class DriverLock:
    """The driver lock of one run directory (a context manager).

    Args:
        run_dir: the run directory (must exist).

    Raises (on enter):
        RunDirError: another live driver holds the lock, naming its host and pid and how to
            clear a lock that is stale.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        """The stale holder this driver replaced, if any."""

    def _refuse(self, holder: dict[str, Any] | None, why: str) -> RunDirError:
        return RunDirError(
            f"{self.path.parent} is being run by {_describe(holder)}: {why}. Wait for that run "
            f"to finish or stop it (`codelens status {self.path.parent}` shows its progress). "
            f"If no codelens run is running there any more, delete {self.path} and start again."
        )

    def __enter__(self) -> DriverLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise self._refuse(_holder(fd), "it holds the run directory's lock") from None
            holder = _holder(fd)
            host = socket.gethostname()
            if holder and holder.get("pid") != os.getpid():
                # The flock was free, so any holder written here is gone, unless the file system
                # does not support flock across hosts and it runs elsewhere.
                if holder.get("host") != host:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise self._refuse(
                        holder, "its lock names another host, which cannot be checked"
                    )
                if isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
                    log.warning("taking over the lock of %s: it holds no lock", _describe(holder))
                else:
                    log.warning("taking over a stale lock left by %s", _describe(holder))
                self.took_over = holder
            me = {
                "host": host,
                "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
