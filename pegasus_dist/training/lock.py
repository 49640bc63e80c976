"""One run at a time in a run folder.

Two trainings writing one folder overwrite and prune each other's
checkpoints and may resume from each other's. So the main process holds an
exclusive ``flock`` on ``<run>/.lock`` for the whole run, and a second run
stops before it touches the folder, with one line naming the holder (its pid,
host and start time, which the holder writes into the file).

Stale locks recover by themselves: the kernel drops a ``flock`` when the last
descriptor of its open file closes, which includes the death of the process
by SIGKILL, so the file a dead run leaves behind locks nothing. The file is
never deleted (deleting it would let two runs lock two different files). On
NFS, Linux emulates ``flock`` with locks that other clients see; a filesystem
without locks (some Lustre mounts) gets a warning and no protection.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from pegasus_dist.errors import PegasusError

log = logging.getLogger("pegasus_dist.training.lock")

LOCK_FILE = ".lock"
# A lock belongs to an open file: a second open in this process would conflict with the
# first. So the locks this process holds are kept here, by run folder, until released.
_held: dict[Path, int] = {}


class RunFolderInUse(PegasusError):  # noqa: N818 (reads as the message it carries)
    """Another live run holds the run folder's lock."""


def hold_run_lock(run_dir: Path) -> None:
    """Lock ``run_dir`` (creating it) for this process, or raise :class:`RunFolderInUse`.

    Holding it already is fine: e.g. the pretrain and finetune of one pipeline in one process.
    """
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's line stays
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderInUse(
                f"run folder {run_dir} is in use by {_holder(path)}; wait for that run to end, "
                "or train into another run.name"
            ) from None
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("the filesystem of %s has no file locks (%s): nothing stops a second "
                        "run from writing into this run folder at the same time", run_dir, err)
            return
        raise
    _held[key] = fd
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
                  + "\n").encode())


def release_run_lock(run_dir: Path) -> None:
    """Let another run use ``run_dir``; nothing to do when this process does not hold it."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file drops the lock


def _holder(path: Path) -> str:
    """``pid P on host H since T``, as the holder wrote it."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"  # caught between lock and write
