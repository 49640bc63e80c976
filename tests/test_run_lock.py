"""One run at a time in a run folder: a second one stops in one line, naming the run that holds it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock, Timeout
from helpers import SMOKE, cli_here, error_lines
from processes import BIN, REPO, run_bounded

from pegasus_dist.training.lock import LOCK_FILE, RunFolderInUse, hold_run_lock, release_run_lock

HOLD = "import sys, time; from pathlib import Path; from pegasus_dist.training.lock import hold_run_lock; " \
       "hold_run_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another process holding the run folder ``<tmp_path>/pretrain``: (that process, the folder)."""
    run = tmp_path / "pretrain"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc, run
    finally:
        proc.kill()
        proc.wait()


def in_use_by(run: Path, pid: int) -> str:
    return f"run folder {run} is in use by pid {pid} on {socket.gethostname()} since "


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def train_args(run: Path, *extra: str) -> list[str]:
    """The smoke config into ``run``; it never gets as far as reading its (absent) shards."""
    return ["--config", SMOKE, f"data.shards={run.parent / 'shards'}", f"run.output_dir={run.parent}",
            "wandb.mode=disabled", *extra]


@pytest.mark.process
def test_a_second_run_stops_in_one_line_and_a_killed_holders_lock_is_free_at_once(holder, capsys):
    proc, run = holder
    before = files(run.parent)
    with pytest.raises(RunFolderInUse) as refused:
        hold_run_lock(run)
    assert in_use_by(run, proc.pid) in str(refused.value)

    # Through cli_here, which leaves logging as it found it (`train` sets it up on the
    # captured stream; left behind, later tests would log into that stream once closed).
    code, out = cli_here(capsys, "train", *train_args(run))
    assert code == 2, out
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert in_use_by(run, proc.pid) in errors[0]
    assert errors[0].endswith("wait for that run to end, or train into another run.name")
    assert files(run.parent) == before  # the refused run wrote nothing, the holder's line included

    proc.kill()
    proc.wait()
    hold_run_lock(run)  # the kernel dropped the dead holder's lock: nothing to clean up
    try:
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(run)


def test_the_lock_is_the_operating_systems_and_ends_with_release(tmp_path):
    other = FileLock(tmp_path / LOCK_FILE, thread_local=False)  # any other locker, in any process
    hold_run_lock(tmp_path)
    try:
        hold_run_lock(tmp_path)  # again in this process (pretrain, then finetune): fine
        with pytest.raises(Timeout):
            other.acquire(blocking=False)
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    finally:
        release_run_lock(tmp_path)
    other.acquire(blocking=False)
    other.release()
    release_run_lock(tmp_path)  # not held: nothing to do


@pytest.mark.process
def test_with_two_ranks_the_rank_that_holds_no_lock_stops_in_the_same_one_line(holder):
    proc, run = holder
    # Only the main process takes the lock: rank 1 must learn of the refusal from rank 0.
    two = run_bounded([str(BIN / "accelerate"), "launch", "--config_file",
                       str(REPO / "launch/cpu-2proc-gloo.yaml"), str(REPO / "pegasus_dist/train.py"),
                       *train_args(run)], timeout=180)
    errors = error_lines(two.stdout)
    # Exit code 1: accelerate's launcher turns its ranks' 2 into its own 1.
    assert two.returncode == 1 and len(errors) == 1, two.stdout[-3000:]
    assert in_use_by(run, proc.pid) in errors[0], two.stdout[-3000:]  # "error: rank 0: run folder ..."
    assert errors[0].endswith("wait for that run to end, or train into another run.name")
