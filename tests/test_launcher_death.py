"""A killed launcher takes its ranks with it: none trains on unsupervised or waits on a dead store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMOKE, wait_until
from processes import BIN, REPO, descendants, running

from pegasus_dist.model.saved import checkpoint_name, latest_checkpoint

GONE_WITHIN_S = 15


def launch(shards: Path, runs: Path) -> subprocess.Popen:
    """2 gloo ranks with a loader worker each, steps slowed by 300 ms: far longer than the test waits."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch/cpu-2proc-gloo.yaml"),
           str(REPO / "pegasus_dist/train.py"), "--config", SMOKE, f"data.shards={shards}",
           f"run.output_dir={runs}", "wandb.mode=disabled", "data.batch_size=8", "train.log_every=1",
           "train.max_steps=400", "data.mode=stream", "data.num_workers=1"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PEGASUS_FAULT": "slow:ms=300"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # the launcher leads its own process group


def rank_pids(launcher: subprocess.Popen) -> set[int]:
    """The launcher's children (their loader workers are their children in turn)."""
    return {pid for pid in descendants(launcher.pid) if _parent(pid) == launcher.pid}


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


@pytest.mark.process
@pytest.mark.parametrize(("when", "kill"), [("starting", os.killpg), ("training", os.kill)])
def test_every_rank_exits_within_seconds_of_a_sigkilled_launcher(smoke_shards, tmp_path, when, kill):
    """SIGKILL for the launcher's process group (it holds no rank: they have sessions of their own)
    while the ranks start up, and for the launcher alone while they train."""
    launcher = launch(smoke_shards, tmp_path)
    run = tmp_path / "pretrain"
    ranks: set[int] = set()
    try:
        if when == "starting":  # both ranks exist, and are still importing: before any rendezvous
            wait_until(lambda: len(rank_pids(launcher)) == 2, launcher, 60)
        else:
            wait_until(lambda: (run / "metrics.jsonl").is_file(), launcher, 180)
        ranks = descendants(launcher.pid)  # the ranks and anything they started
        assert len(rank_pids(launcher)) == 2
        kill(launcher.pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(running(pid) for pid in ranks) and time.monotonic() - killed < 60:
            time.sleep(0.1)
        seconds = time.monotonic() - killed
        left = sorted(pid for pid in ranks if running(pid))
        assert not left, f"processes {left} of the run still run {seconds:.0f}s after the launcher died"
        out, _ = launcher.communicate(timeout=30)  # the ranks held the pipe: it ends with them
        assert seconds < GONE_WITHIN_S, f"ranks took {seconds:.1f}s to exit\n{out[-3000:]}"
    finally:  # nothing outlives a failed test
        for pid in ranks | descendants(launcher.pid):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    if when == "training":  # SIGTERM stopped the run as a requeue would: at a sync point, saved
        step = int(out.split("stopped by signal at step ")[1].split(";")[0])
        assert latest_checkpoint(run / "checkpoints").name == checkpoint_name(step)


# A parent that starts CHILD and waits; CHILD follows its parent as a rank would.
PARENT = ("import subprocess, sys; "
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
          "print(child.pid, flush=True); child.wait()")
CHILD = ("import sys, time; from pegasus_dist.training import launcher_watch; sys.platform = sys.argv[1]; "
         "launcher_watch.end_with_launcher(); print('started', flush=True); time.sleep(600)")


@pytest.mark.process
def test_a_rank_follows_its_parent_only_when_a_launcher_started_it():
    """Both cases side by side, each a parent that starts CHILD and is SIGKILLed."""
    cases = [("darwin", True, True),  # no prctl there: the thread that watches the parent pid
             ("linux", False, False)]  # started from a shell (nohup, say): outlives it, as before
    parents, children = [], []
    try:
        for platform, launched, _ in cases:
            env = {**os.environ, "LOCAL_RANK": "0"} if launched else {
                k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "ACCELERATE_USE_CPU")}
            parents.append(subprocess.Popen([sys.executable, "-c", PARENT, CHILD, platform], cwd=REPO,
                                            env=env, stdout=subprocess.PIPE, text=True))
        children = [int(parent.stdout.readline()) for parent in parents]
        for parent in parents:
            assert parent.stdout.readline() == "started\n"
            parent.kill()
            parent.wait()
        deadline = time.monotonic() + 5
        while running(children[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [not running(child) for child in children] == [ends for _, _, ends in cases]
    finally:
        for process in [*parents, *children]:
            pid = process if isinstance(process, int) else process.pid
            if running(pid):
                os.kill(pid, signal.SIGKILL)
