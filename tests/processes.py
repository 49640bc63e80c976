"""Running real processes from tests: bounded in time, and nothing left behind on a hang."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
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


def on_ranks(script: Path | str, *args: str, nproc: int = 2, timeout: float = 180,
             env: dict[str, str] | None = None) -> str:
    """``script`` on ``nproc`` local gloo processes (:class:`Ranks`); its output, once it succeeded."""
    done = run_ranks([str(script), *args], nproc, timeout, env)
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


def machine_env(rank: int, world_size: int, port: int, per_machine: int = 1) -> dict[str, str]:
    """What torchrun gives rank ``rank`` of a job of ``per_machine``-process machines (one by
    default): a rank started without a launcher, so that a test can watch, stop or end each one."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank % per_machine), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(per_machine), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class Ranks:
    """``nproc`` ranks of one machine started as torchrun starts them, without a launcher.

    Each rank is ``python SCRIPT ARGS`` with torchrun's variables, so each is forked warm
    (:mod:`warm`): a launcher and its ranks would import torch afresh, seconds a launch. The
    launcher stays the subject where it matters (tests/test_launch.py, test_launcher_death.py,
    test_pipeline.py, the SLURM jobs, the rank faults of test_faults.py); elsewhere the tests
    compare what ranks compute, which does not depend on who started them. What a launcher
    gives its caller is here too: every rank's output, one exit code, and one end for all.
    """

    def __init__(self, argv: list[str], nproc: int, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.procs = [popen([sys.executable, *argv], env=(env or {}) | machine_env(rank, nproc, port, nproc))
                      for rank in range(nproc)]
        self._open = {proc.stdout.fileno(): rank for rank, proc in enumerate(self.procs)}
        self._chunks: list[list[bytes]] = [[] for _ in self.procs]

    @property
    def returncode(self) -> int | None:
        """The first failing rank's code, as torchrun reports it; 0 when every rank succeeded."""
        codes = [proc.returncode for proc in self.procs]
        if None in codes:
            return None
        return next((code for code in codes if code), 0)

    def poll(self) -> int | None:
        for proc in self.procs:
            proc.poll()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Every rank's output, rank after rank, once all have ended, as Popen's (output, None);
        TimeoutExpired after ``timeout`` (what was read stays: a call after :meth:`kill` returns it all).

        The pipes are read together: a rank blocked on a full pipe would stall the others."""
        deadline = time.monotonic() + (timeout if timeout is not None else 10**9)
        while self._open:
            ready = select.select(list(self._open), [], [], max(0.0, deadline - time.monotonic()))[0]
            if not ready:
                raise subprocess.TimeoutExpired(self.procs[0].args, timeout)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    self._chunks[self._open[fd]].append(chunk)
                else:
                    del self._open[fd]
        self.wait(max(0.0, deadline - time.monotonic()) + 5)
        return "".join(b"".join(c).decode("utf-8", errors="replace") for c in self._chunks), None

    def wait(self, timeout: float | None = None) -> int:
        for proc in self.procs:
            proc.wait(timeout)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL every rank still running, with what it started (each rank has a session of its own)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):  # that rank and all it started have ended
                os.killpg(proc.pid, signal.SIGKILL)


def run_ranks(argv: list[str], nproc: int, timeout: float,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """:class:`Ranks` run to their end: every rank's output and one exit code; on timeout all are killed
    and the test fails, as :func:`run_bounded`."""
    ranks = Ranks(argv, nproc, env)
    try:
        out, _ = ranks.communicate(timeout)
    except subprocess.TimeoutExpired:
        ranks.kill()
        out, _ = ranks.communicate(30)
        raise AssertionError(f"{nproc} ranks timed out after {timeout}s: {' '.join(argv)}\n"
                             f"{out[-4000:]}") from None
    except BaseException:
        ranks.kill()
        raise
    return subprocess.CompletedProcess(argv, ranks.returncode, out, "")
