"""Running real processes from tests: bounded in time, and nothing left behind on a hang."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from warm import BIN as BIN  # the tests import it from here
from warm import WarmProcess, warm_target

REPO = Path(__file__).resolve().parents[1]


def popen(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen | WarmProcess:
    """``cmd`` in a session of its own (killable as a whole), its stdout and stderr on one text pipe.

    A Python script or a console script is forked from an interpreter that has imported torch
    already (:mod:`warm`: seconds less per run); anything else starts as usual.
    """
    env = {**os.environ, **(env or {})}
    argv = warm_target(cmd, cwd, env)
    if argv is not None:
        return WarmProcess(argv, cwd, env)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_bounded(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail.

    ``subprocess.run(timeout=...)`` kills only the direct child: the workers a
    launcher started would keep running (and keep a port) after a hang.
    """
    proc = popen(cmd, env, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    except BaseException:  # pytest-timeout or Ctrl-C first: leave no rank hung in a collective behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(script: Path | str, *args: str, nproc: int = 2, timeout: float = 180,
             env: dict[str, str] | None = None) -> str:
    """Launch ``script`` on ``nproc`` local gloo processes; return the output, assert success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]
    done = run_bounded(cmd, timeout, env)
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (children, their children, ...), read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    """A port of its own for each process group, so that launches running side by side never meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun gives rank ``rank`` of a job of one-process machines: a rank started without a
    launcher, so that a test can watch, stop or end each one."""
    return {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
