"""The warm server's children behave as ``python SCRIPT ARGS`` does, in what the tests look at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from processes import BIN, Ranks, popen, run_bounded, run_ranks
from warm import WarmProcess

pytestmark = pytest.mark.process

SCRIPT = """\
import atexit, os, sys
atexit.register(lambda: print("atexit ran", flush=True))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("WARM_TEST"), flush=True)
print("path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "main", __name__)
if sys.argv[1] == "raise":
    raise ValueError("from the script")
if sys.argv[1] == "wait":
    print("waiting", flush=True)
    import time; time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def test_a_warm_child_takes_argv_cwd_env_and_exits_as_python_would(script, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = popen([sys.executable, str(script), "3"], env={"WARM_TEST": "yes"}, cwd=cwd)
    assert isinstance(proc, WarmProcess)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert out.splitlines() == [f"argv ['3'] cwd {cwd} env yes", "path0 True main __main__", "atexit ran"]

    done = run_bounded([sys.executable, str(script), "raise"], timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-2:] == ["ValueError: from the script", "atexit ran"], done.stdout


def test_a_warm_child_is_its_own_session_and_dies_by_the_signal_sent(script):
    proc = popen([sys.executable, str(script), "wait"])
    assert isinstance(proc, WarmProcess)
    deadline = time.monotonic() + 60
    while "waiting" not in proc.stdout.readline():
        assert time.monotonic() < deadline
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    assert proc.poll() is None
    assert os.getsid(proc.pid) == proc.pid  # killpg(proc.pid) ends it and all it started
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_what_an_interpreter_reads_at_start_or_other_commands_start_fresh(script):
    fresh = [popen([sys.executable, str(script), "0"], env={"OMP_NUM_THREADS": "2"}),
             popen([sys.executable, "-c", "print('fresh')"])]
    warm = popen([str(BIN / "pegasus-dist"), "--version"])
    assert [type(proc) for proc in (*fresh, warm)] == [subprocess.Popen, subprocess.Popen, WarmProcess]
    outputs = [proc.communicate(timeout=60)[0] for proc in (*fresh, warm)]
    assert [proc.returncode for proc in (*fresh, warm)] == [0, 0, 0], outputs
    assert outputs[2].startswith("pegasus-dist "), outputs[2]


RANK_SCRIPT = """\
import os, sys, time
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
print(" ".join(f"{key}={os.environ[key]}" for key in keys), "x" * 100_000, flush=True)  # past a pipe's 64 KiB
if sys.argv[1] == "wait":
    time.sleep(60)
sys.exit(int(os.environ["RANK"]) * int(sys.argv[1]))
"""


def test_ranks_start_as_torchrun_starts_them_and_end_as_one(tmp_path):
    """processes.Ranks, which the distributed tests start their ranks with: torchrun's variables,
    every rank's output, the first failing rank's code, and one kill for all."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    done = run_ranks([str(script), "3"], 3, timeout=60)
    assert done.returncode == 3  # rank 1's, the first that failed (rank 2 exits 6)
    assert [line[:70] for line in done.stdout.splitlines()] == [
        f"RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 xxxx"[:70]
        for rank in range(3)]
    assert run_ranks([str(script), "0"], 2, timeout=60).returncode == 0

    ranks = Ranks([str(script), "wait"], 2)
    assert all(isinstance(proc, WarmProcess) for proc in ranks.procs)
    with pytest.raises(subprocess.TimeoutExpired):
        ranks.communicate(timeout=1)
    assert ranks.poll() is None
    ranks.kill()
    out, _ = ranks.communicate(timeout=30)
    assert ranks.returncode == -signal.SIGKILL and out.count(" WORLD_SIZE=2 ") == 2
