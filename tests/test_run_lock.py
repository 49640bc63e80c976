"""One run at a time in a run folder: a second one stops in one line, naming the run that holds it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAULT, SMOKE
from processes import BIN, REPO, run_bounded
from safetensors.torch import load_file

from pegasus_dist.training.lock import RunFolderInUse, hold_run_lock, release_run_lock

HOLD = "import sys, time; from pathlib import Path; from pegasus_dist.training.lock import hold_run_lock; " \
       "hold_run_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunFolderInUse) as refused:
            hold_run_lock(tmp_path)
        assert f"run folder {tmp_path} is in use by pid {holder.pid} on {socket.gethostname()} since " \
            in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    hold_run_lock(tmp_path)  # the kernel dropped the dead holder's lock: nothing to clean up
    release_run_lock(tmp_path)


def train_args(shards: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, f"data.shards={shards}", f"run.output_dir={runs}", "wandb.mode=disabled",
            "data.batch_size=16", "train.log_every=1", "train.max_steps=40", "train.checkpoint_every=8",
            *extra]


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_stops_in_one_line_and_the_first_is_undisturbed(
        smoke_shards, tmp_path):
    ref = run_bounded([str(BIN / "pegasus-dist"), "train", *train_args(smoke_shards, tmp_path / "ref")],
                      timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:]

    # The first run, slowed down (500 ms a step, same numbers) so that the others start while it trains.
    first = subprocess.Popen([sys.executable, str(FAULT), "slow", "500", "0",
                              *train_args(smoke_shards, tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run = tmp_path / "pretrain"
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.1)
        config = (run / "config.yaml").read_text()
        # A second run (another seed) alone, and one of 2 ranks: rank 1 must learn it from rank 0.
        other = train_args(smoke_shards, tmp_path, "train.seed=1")
        alone = subprocess.Popen([str(BIN / "pegasus-dist"), "train", *other], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        two = run_bounded([str(BIN / "accelerate"), "launch", "--config_file",
                           str(REPO / "launch/cpu-2proc-gloo.yaml"), str(REPO / "pegasus_dist/train.py"),
                           *other], timeout=180)
        alone_out, _ = alone.communicate(timeout=180)
        assert first.poll() is None, "the first run ended before the others tried: slow it down more"
        # Exit code 2; accelerate's launcher turns its ranks' 2 into its own 1.
        for out, code in ((alone_out, alone.returncode), (two.stdout, two.returncode + 1)):
            errors = [line for line in out.splitlines() if line.startswith("error: ")]
            assert code == 2 and len(errors) == 1, out[-3000:]
            # "error: rank 0: run folder ..." with 2 ranks: the one that holds the lock says it.
            assert f"run folder {run} is in use by pid {first.pid} on {socket.gethostname()} since " \
                in errors[0], out[-3000:]
            assert "wait for that run to end, or train into another run.name" in errors[0]
        assert (run / "config.yaml").read_text() == config  # the refused runs wrote nothing
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, out[-3000:]
    final = "checkpoints/step_00000040/model.safetensors"
    got, expected = load_file(run / final), load_file(tmp_path / "ref" / "pretrain" / final)
    assert got.keys() == expected.keys()
    assert all(got[name].equal(expected[name]) for name in got)  # to the bit
