"""Start the tests' CLI and script runs forked from an interpreter that has already imported torch.

A fresh Python process spends about 3 CPU-seconds importing torch and ``torch._dynamo`` (which
torch's optimizers import at their first step) before the project's code runs; the suite starts
about a hundred such runs. This module's server imports them once, then forks one child per
request; the child takes the request's arguments, environment, working directory and standard
streams, starts a session of its own and runs the script as ``python SCRIPT ARGS`` would, as
``__main__``, with the same exit path (atexit handlers, exit code, the traceback of an uncaught
exception, death by signal). It is a real process: signals, process groups, ``/proc`` and the
exit status are its own.

What a fork cannot change is what the interpreter read at its start. Such runs (other
interpreter flags, other ``PYTHON*``, OpenMP or loader variables) start fresh; so does every
command that is not a Python script or ``pegasus-dist`` (:func:`warm_target`).
``PEGASUS_TESTS_FRESH=1`` starts every process fresh.

Run as ``python tests/warm.py SOCKET``: the server. Imported: the client, :class:`WarmProcess`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torchvision", "accelerate", "pydantic", "numpy", "safetensors")
# Read once when an interpreter (or a library it loads) starts: a run that sets them otherwise starts fresh.
READ_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "MALLOC_")
MAX_REQUEST = 1 << 20  # bytes: argv and environment of one request


def _server_loop(path: str) -> tuple[dict, list[int]]:
    """Serve requests on ``path`` until the parent (the pytest worker) ends; returns only in a child."""
    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:  # a fork copies one thread: locks held by others stay held
        raise SystemExit(f"warm server: importing {PRELOAD} started threads; cannot fork safely")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(f"{path}.new")
    listener.listen(64)
    os.rename(f"{path}.new", path)  # the client connects once the path exists: listening by then
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that gets its exit code
    parent = os.getppid()
    while os.getppid() == parent:
        if select.select([listener], [], [], 0.02)[0]:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
            pid = os.fork()
            if pid == 0:
                for other in (listener, conn, *waiting.values()):
                    other.close()
                return json.loads(message), fds
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            waiting[pid] = conn
        _reap(waiting)
    raise SystemExit(0)


def _reap(waiting: dict[int, socket.socket]) -> None:
    """Send each ended child's exit code (negative: the signal that ended it) to its client."""
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = waiting.pop(pid)
        with contextlib.suppress(OSError):  # the client is gone (its test failed or ended): nobody to tell
            conn.send(str(os.waitstatus_to_exitcode(status)).encode())
        conn.close()


def _become(request: dict, fds: list[int]) -> None:
    """In the forked child: take the request's streams, session, place and environment, then run it."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # As `python -u`: what a test waits for appears at once (output is never lost at exit either way).
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")


# --- the client, in the pytest worker --------------------------------------------------------------

BIN = Path(sys.executable).parent  # this environment's interpreter and console scripts


def warm_target(cmd: list[str], cwd: Path, env: dict[str, str]) -> list[str] | None:
    """``sys.argv`` of the script that ``cmd`` runs, if a warm fork can run it; else None.

    Two shapes qualify: ``python SCRIPT.py ARGS`` (no interpreter flags) and the project's
    console script (``.venv/bin/pegasus-dist ARGS``), in an environment that agrees with the
    server's on everything read at start-up. Launchers (``accelerate launch``, torchrun) start
    fresh: they supervise and signal the ranks, and forking them measured no faster.
    """
    if os.environ.get("PEGASUS_TESTS_FRESH") == "1":
        return None
    argv = _script_argv(cmd, cwd)
    if argv is None or _differs_at_start(env, _server()[1]):
        return None
    return argv


def _script_argv(cmd: list[str], cwd: Path) -> list[str] | None:
    program = Path(cmd[0])
    if program == BIN / "pegasus-dist":
        return list(cmd)
    if program.parent == BIN and program.name.startswith("python") and len(cmd) > 1:
        script = cwd / cmd[1]
        return cmd[1:] if script.suffix == ".py" and script.is_file() else None
    return None


def _differs_at_start(env: dict[str, str], server_env: dict[str, str]) -> bool:
    keys = {key for key in {*env, *server_env} if key.startswith(READ_AT_START)}
    return any(env.get(key) != server_env.get(key) for key in keys)


class WarmProcess:
    """The part of :class:`subprocess.Popen` the tests use, for a child of the warm server.

    Output (stdout and stderr together, as ``stderr=STDOUT``) arrives on ``stdout`` as text.
    """

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.args, self.returncode, self._read = argv, None, []
        read, write = os.pipe()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._conn.settimeout(60)  # a fork takes milliseconds: a server that does not answer is stuck
        try:
            with open(os.devnull, "rb") as null:
                self._conn.connect(str(_server()[0]))
                request = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
                socket.send_fds(self._conn, [request], [null.fileno(), write, write])
            self.pid = int(self._conn.recv(64))
            self._conn.settimeout(None)  # from here on select() bounds every wait
        finally:
            os.close(write)  # the child holds its own copy: EOF on `read` once it (and its children) end
        self.stdout = open(read, encoding="utf-8", errors="replace")  # noqa: SIM115 (Popen's is open too)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._take_exit_code()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._take_exit_code()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """All its output and its end, as Popen's: TimeoutExpired leaves both to a second call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.stdout], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = os.read(self.stdout.fileno(), 65536)
            if not chunk:
                break
            self._read.append(chunk)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()) + 5)
        return b"".join(self._read).decode("utf-8", errors="replace"), None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _take_exit_code(self) -> None:
        answer = self._conn.recv(64)
        if not answer:
            raise RuntimeError(f"the warm server ended before pid {self.pid}; see {_LOG}")
        self.returncode = int(answer)
        self._conn.close()


_LOG = Path(tempfile.gettempdir()) / f"pegasus-warm-{os.getpid()}.log"


@functools.cache
def _server() -> tuple[Path, dict[str, str]]:
    """This worker's server, started at the first request (seconds: it imports torch): its socket,
    and the environment it started with."""
    path = _LOG.with_suffix(".sock")
    path.unlink(missing_ok=True)
    with open(_LOG, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(path)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    for leftover in (_LOG, path):
        atexit.register(leftover.unlink, missing_ok=True)
    atexit.register(proc.kill)
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the warm server did not start: {_LOG.read_text()[-3000:]}")
        time.sleep(0.05)
    return path, dict(os.environ)


def main() -> None:
    request, fds = _server_loop(sys.argv[1])
    _become(request, fds)


if __name__ == "__main__":
    main()
