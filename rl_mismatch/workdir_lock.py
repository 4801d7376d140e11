"""One run per workdir: an exclusive lock held for the whole run.

Two processes writing one workdir destroy each other's run: the second one rewrites
``metrics.jsonl`` under the first and deletes its unfinished checkpoint. :class:`WorkdirLock`
makes the second process fail at once, naming the holder::

  with WorkdirLock(workdir):
      ...  # the run

The lock is an ``fcntl.flock`` on ``<workdir>/.lock.<process index>``, a file that holds the
holder's PID, host and start time for the message. The kernel releases it when the holder exits
in any way (``kill -9`` included), so a crashed run never leaves a stale lock behind; the file
stays and is simply locked again by the next run. ``flock`` belongs to an open file, so a second
lock from the same process is refused too. On NFS, Linux clients implement ``flock`` with the
server's byte-range locks, so hosts sharing the file system see each other's lock.

Multi-host runs share their workdir by design: each process locks its own file, named by its
``jax.process_index()``. A second job on the same workdir collides on process 0's file (and on
every other process's) and stops there.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket

LOCK_PREFIX = ".lock."


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive, non-blocking lock on ``workdir`` for one process of a run.

    Args:
      workdir: an existing directory.
      process_index: this process's index in a multi-host run (one lock file per index).

    Raises (from :meth:`acquire` and ``__enter__``):
      WorkdirBusyError: another process holds the lock; the message names its PID and host.
    """

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.path = os.path.join(os.fspath(workdir), f"{LOCK_PREFIX}{process_index}")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            raise WorkdirBusyError(
                f"The workdir {os.path.dirname(self.path)!r} is in use by another run ({holder}). Wait for "
                "it to finish or stop it, or pass another --workdir.") from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing the descriptor drops the lock; the file stays.
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
