"""One run at a time in a run folder (two would prune and resume from each other's checkpoints).

An exclusive ``filelock`` on ``<run>/.lock``: the kernel drops a ``flock`` when its process dies, SIGKILL
included; the file is never deleted (``preserve_lock_file``), so two runs never lock two different files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from pegasus_dist.errors import PegasusError

log = logging.getLogger("pegasus_dist.training.lock")

LOCK_FILE = ".lock"
# The locks this process holds, by run folder, until released.
_held: dict[Path, FileLock] = {}


class RunFolderInUse(PegasusError):  # noqa: N818 (reads as the message it carries)
    """Another live run holds the run folder's lock."""


def hold_run_lock(run_dir: Path) -> None:
    """Lock ``run_dir`` (creating it), or raise :class:`RunFolderInUse`; holding it already is fine
    (the pretrain and finetune of one pipeline in one process)."""
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    # thread_local=False: the lock is the process's, whichever thread releases it.
    lock = FileLock(path, thread_local=False, preserve_lock_file=True, on_acquired=_write_holder)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise RunFolderInUse(f"run folder {run_dir} is in use by {_holder(path)}; wait for that "
                             "run to end, or train into another run.name") from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("the filesystem of %s has no file locks (%s): nothing stops a second "
                    "run from writing into this run folder at the same time", run_dir, err)
        return
    _held[key] = lock


def release_run_lock(run_dir: Path) -> None:
    """Let another run use ``run_dir``; nothing to do when this process does not hold it."""
    if (lock := _held.pop(run_dir.resolve(), None)) is not None:
        lock.release()


def _write_holder(fd: int) -> None:
    """Write this process into the lock file it has just locked, for :func:`_holder` to read."""
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)


def _holder(path: Path) -> str:
    """``pid P on host H since T``, as the holder wrote it."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"  # caught between lock and write
