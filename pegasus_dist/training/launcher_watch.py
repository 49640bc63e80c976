"""A rank ends when its launcher dies.

torchrun puts each rank in a session of its own, so a killed ``accelerate launch`` would leave
its ranks running with parent 1 (README.md, "Fault tolerance"). A shell's run outlives the shell.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("pegasus_dist.training.launcher_watch")

# Set by torchrun (accelerate launch --multi_gpu, several machines) and by accelerate's
# one-process launcher; a process with neither was started from a shell.
LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_USE_CPU")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_S = 1.0  # how often the fallback thread looks at the parent pid
LAUNCHERS = (b"accelerate", b"torchrun", b"torch.distributed.run")


def end_with_launcher() -> None:
    """Call first thing in a launched training process: SIGTERM to it when its launcher dies."""
    if not any(name in os.environ for name in LAUNCHER_ENV):
        return
    parent = os.getppid()
    if not _ask_kernel_for_sigterm():  # the fallback: a daemon thread that watches the parent pid
        threading.Thread(target=_end_orphaned, args=(parent,), name="launcher-watch", daemon=True).start()
    # The launcher may have died before the request (while this process imported): no signal.
    if os.getppid() != parent or _adopted_by_init(parent):
        log.error("the launcher of this process is gone (parent is now pid %d): exiting", os.getppid())
        os.kill(os.getpid(), signal.SIGTERM)


def _ask_kernel_for_sigterm() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGTERM)``; False where there is no such call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def _end_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _adopted_by_init(parent: int) -> bool:
    """Whether parent pid 1 means the launcher died, rather than that PID 1 is the launcher (as in
    a container whose command is ``accelerate launch``)."""
    if parent != 1:
        return False
    if not sys.platform.startswith("linux"):
        return True  # macOS: PID 1 is launchd, never a launcher
    try:
        command = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False  # cannot tell: rather keep a healthy run than end it
    return not any(name in command for name in LAUNCHERS)
