"""Launches that explain themselves: start-up faults, complete runs, exit codes, launcher flags.

Each test reads what a person would: the exit code, the ``error:`` lines of
the combined output of every rank and the launcher, and the run folder.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SMOKE, TINY_ARGS, error_lines, overrides
from PIL import Image
from processes import BIN, REPO, free_port, popen, run_bounded

from pegasus_dist.config import load_config
from pegasus_dist.training.state import TrainState, is_complete

TRAIN = str(REPO / "pegasus_dist/train.py")
USAGE = "usage: pegasus_dist/train.py [-h] --config CONFIG [section.key=value ...]"


def cli_train(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_bounded([str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *args], timeout,
                       env={"WANDB_API_KEY": ""})


def accelerate(nproc: int, *args: str, timeout: float = 180, fault: str = "") -> subprocess.CompletedProcess:
    """``accelerate launch ARGS`` on 1 or 2 CPU processes, with the fault plan ``fault`` (PEGASUS_FAULT)."""
    config = REPO / ("launch/cpu-2proc-gloo.yaml" if nproc == 2 else "launch/cpu-1proc.yaml")
    port = ["--main_process_port", str(free_port())] if nproc > 1 else []
    return run_bounded([str(BIN / "accelerate"), "launch", "--config_file", str(config), *port, *args],
                       timeout, env={"WANDB_API_KEY": "", "PEGASUS_FAULT": fault})


def assert_no_traceback_of_ours(out: str) -> None:
    """The launcher may print its own traceback; none may pass through this project's code."""
    assert f'File "{REPO / "pegasus_dist"}' not in out, out[-4000:]


def offline_runs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "wandb").glob("offline-run-*"))


def test_complete_means_epochs_done_or_max_steps_reached(tmp_path):
    def cfg(epochs: int, max_steps: int):
        return load_config(SMOKE, [f"train.epochs={epochs}", f"train.max_steps={max_steps}"])

    assert is_complete(TrainState(phase="pretrain", epoch=3, step=90), cfg(3, 0))
    assert not is_complete(TrainState(phase="pretrain", epoch=2, samples_done=464, step=89), cfg(3, 0))
    assert is_complete(TrainState(phase="pretrain", epoch=0, samples_done=64, step=4), cfg(3, 4))
    assert not is_complete(TrainState(phase="pretrain", epoch=0, samples_done=64, step=4), cfg(3, 8))
    assert not is_complete(TrainState(phase="pretrain", epoch=3, step=90), cfg(4, 0))  # epochs raised


@pytest.mark.process
def test_a_rank_that_cannot_start_ends_every_rank_with_one_line_before_wandb(checkpointed_run):
    # Two processes resume a one-process run's checkpoint, and only rank 1 fails to
    # restore it (an injected fault, as on a node whose disk fails).
    run = checkpointed_run.pretrain
    before = (run / "metrics.jsonl").read_text()
    done = accelerate(2, TRAIN, "--config", SMOKE, *checkpointed_run.overrides, "train.max_steps=8",
                      "wandb.mode=offline", fault="fail:at=restore:rank=1")
    assert done.returncode == 1  # what accelerate launch makes of any failure (README: exit codes)
    assert error_lines(done.stdout) == [
        "error: rank 1: an injected fault in the start-up stage restore (PEGASUS_FAULT)"
    ], done.stdout[-4000:]
    assert_no_traceback_of_ours(done.stdout)
    assert "wandb: Tracking run" not in done.stdout  # rank 0 stopped before W&B
    assert (offline_runs(run), (run / "metrics.jsonl").read_text()) == ([], before)


@pytest.mark.process
def test_a_rank_that_crashes_at_start_up_keeps_its_traceback(smoke_shards, tmp_path):
    done = accelerate(2, TRAIN, "--config", SMOKE, *overrides(smoke_shards, tmp_path, 2, *TINY_ARGS),
                      fault="crash:at=checks:rank=1")
    crash = "RuntimeError: an injected crash at start-up stage checks (PEGASUS_FAULT)"
    assert done.returncode == 1
    assert error_lines(done.stdout) == [
        f"error: rank 1: {crash} (a crash: its traceback is in that rank's output)"], done.stdout[-4000:]
    assert f"[rank1]: {crash}" in done.stdout  # not swallowed
    assert "[rank0]: Traceback" not in done.stdout  # rank 0 only reports it


@pytest.mark.process
def test_a_config_mistake_of_every_rank_is_reported_once(smoke_shards, tmp_path):
    done = accelerate(2, TRAIN, "--config", SMOKE,
                      *overrides(smoke_shards, tmp_path, 2, "train.epoch=3"))
    assert done.returncode == 1
    assert error_lines(done.stdout) == [
        "error: unknown config key train.epoch; did you mean train.epochs?"], done.stdout[-4000:]
    assert_no_traceback_of_ours(done.stdout)
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.process
def test_a_complete_run_says_so_and_changes_nothing_until_asked(checkpointed_run):
    run = checkpointed_run.pretrain
    files = [run / "metrics.jsonl", run / "config.yaml", run / "samples/pegasus.png",
             *sorted((run / "eval").iterdir())]

    def snapshot() -> tuple:
        return sorted(p.name for p in run.iterdir()), [(f, f.stat().st_mtime_ns, f.read_bytes())
                                                       for f in files]

    before = snapshot()
    again = cli_train(*checkpointed_run.overrides, "wandb.mode=offline")
    assert again.returncode == 0, again.stdout[-3000:]
    assert (f"pretrain in {run} is already complete at step 6 (train.epochs=10, train.max_steps=6; "
            f"checkpoint {run}/checkpoints/step_00000006); raise train.epochs or train.max_steps "
            "to train on") in again.stdout
    assert "Pegasus grid" not in again.stdout and "held-out" not in again.stdout
    assert snapshot() == before  # no sampler, no evaluation, no metrics rows
    assert offline_runs(run) == []  # and no W&B run, though W&B was on

    more = cli_train(*checkpointed_run.overrides, "train.max_steps=7")
    assert more.returncode == 0, more.stdout[-3000:]
    assert f"resumed from {run}/checkpoints/step_00000006" in more.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "pretrain/loss" in r] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.process
def test_a_run_stopped_after_its_final_checkpoint_still_writes_its_grids(checkpointed_run):
    """Killed or preempted between the final checkpoint and the grids: a restart does only the grids."""
    args = checkpointed_run.overrides
    run = checkpointed_run.pretrain
    # What a kill right after the final checkpoint leaves: no grids, no evaluation, no end mark.
    for leftover in ("samples", "eval"):
        shutil.rmtree(run / leftover)
    (run / "finished.json").unlink()
    again = cli_train(*args)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {run}/checkpoints/step_00000006" in again.stdout
    assert "already complete" not in again.stdout
    with Image.open(run / "samples/pegasus.png") as grid:
        assert np.asarray(grid).std() > 0  # a real grid, not a blank canvas
    assert (run / "eval/step_00000006.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "pretrain/loss" in r] == [1, 2, 3, 4, 5, 6]  # nothing trained twice
    assert "already complete at step 6" in cli_train(*args).stdout


@pytest.mark.process
# `pegasus-dist train`'s (exit 2) is tested in this process, in test_config.
@pytest.mark.parametrize(("entry", "code"), [("python", 2), ("accelerate", 1)])
def test_a_bad_config_exits_with_one_line(smoke_shards, tmp_path, entry, code):
    """The exit-code table of the README: accelerate launch turns every failure into 1."""
    args = ["--config", SMOKE, *overrides(smoke_shards, tmp_path, 2, "train.epoch=3")]
    cmd = {"python": [str(BIN / "python"), TRAIN, *args],
           "accelerate": [str(BIN / "accelerate"), "launch", "--config_file",
                          str(REPO / "launch/cpu-1proc.yaml"), TRAIN, *args]}[entry]
    done = run_bounded(cmd, timeout=120)
    assert done.returncode == code, done.stdout[-3000:]
    assert error_lines(done.stdout) == [
        "error: unknown config key train.epoch; did you mean train.epochs?"], done.stdout[-3000:]
    assert_no_traceback_of_ours(done.stdout)


def cpu_limit_passed(pid: int) -> None:
    """Lower ``pid``'s soft CPU-time limit below what it has used, as `prlimit --cpu` would: the
    kernel sends SIGXCPU at once and then every CPU second (the hard limit, its SIGKILL, is kept)."""
    hard = resource.prlimit(pid, resource.RLIMIT_CPU)[1]
    resource.prlimit(pid, resource.RLIMIT_CPU, (1, hard))  # its start-up alone takes seconds


@pytest.mark.process
@pytest.mark.parametrize(("stop", "received"), [
    (lambda proc: proc.send_signal(signal.SIGUSR1), "SIGUSR1"),
    (lambda proc: cpu_limit_passed(proc.pid), "SIGXCPU"),  # then again, every CPU second
], ids=["SIGUSR1", "CPU-time limit"])
def test_pegasus_dist_train_stopped_by_a_signal_exits_75(smoke_shards, tmp_path, stop, received):
    proc = popen([str(BIN / "pegasus-dist"), "train", "--config", SMOKE,
                  *overrides(smoke_shards, tmp_path, 100_000, "train.epochs=10000", *TINY_ARGS)])
    metrics = tmp_path / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # until its first logged step
    stop(proc)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    assert f"received {received}: stopping with a checkpoint within two steps" in out, out[-3000:]
    step = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    assert (tmp_path / f"pretrain/checkpoints/step_{step:08d}/SHA256SUMS").is_file()
    assert_no_traceback_of_ours(out)


@pytest.mark.process
@pytest.mark.parametrize("entry", [[str(BIN / "pegasus-dist"), "train"], [str(BIN / "python"), TRAIN]],
                         ids=["pegasus-dist", "train.py"])
def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130(smoke_shards, tmp_path, entry):
    """The seconds before any of the run's code: an interrupt there is the same line as later."""
    # Ctrl-C as at a terminal: a suite started in the background by a script inherits SIGINT ignored.
    proc = subprocess.Popen([*entry, "--config", SMOKE, *overrides(smoke_shards, tmp_path, 5)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)  # until torch's libraries are mapped: inside its import
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert error_lines(out) == [
        "error: interrupted (Ctrl-C); run the same command again (training resumes from its last "
        "checkpoint)"]


@pytest.mark.process
def test_the_launchers_mixed_precision_is_named_when_the_config_differs(smoke_shards, tmp_path):
    warning = ("accelerate launch --mixed_precision bf16 is not used: this run trains with "
               "train.mixed_precision=no from its config; to train in bf16 pass "
               "train.mixed_precision=bf16")
    ignored = accelerate(1, "--mixed_precision", "bf16", TRAIN, "--config", SMOKE,
                         *overrides(smoke_shards, tmp_path / "a", 1, *TINY_ARGS))
    assert ignored.returncode == 0, ignored.stdout[-3000:]
    assert ignored.stdout.count(warning) == 1 and "mixed_precision=no" in ignored.stdout
    agreed = accelerate(1, "--mixed_precision", "bf16", TRAIN, "--config", SMOKE,
                        *overrides(smoke_shards, tmp_path / "b", 1, "train.mixed_precision=bf16",
                                   *TINY_ARGS))
    assert agreed.returncode == 0, agreed.stdout[-3000:]
    assert "is not used" not in agreed.stdout and "mixed_precision=bf16" in agreed.stdout


@pytest.mark.process
def test_no_arguments_is_one_usage_error():
    alone = run_bounded([str(BIN / "python"), TRAIN], timeout=60)
    assert alone.returncode == 2
    assert alone.stdout.splitlines() == ["error: the following arguments are required: --config",
                                         USAGE]
    launched = run_bounded([str(BIN / "accelerate"), "launch", TRAIN], timeout=60)
    assert launched.returncode == 1  # accelerate's own code for a failed script
    lines = launched.stdout.splitlines()
    assert error_lines(launched.stdout) == ["error: the following arguments are required: --config"]
    assert lines[lines.index(error_lines(launched.stdout)[0]) + 1] == USAGE
    assert_no_traceback_of_ours(launched.stdout)


@pytest.mark.process
def test_a_run_started_with_its_output_closed_trains_to_its_end(smoke_shards, tmp_path):
    """`pegasus-dist train ... >&- 2>&-`, as a daemon may start it: nothing to print to, a whole phase."""
    train = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE,
             *overrides(smoke_shards, tmp_path, 1, *TINY_ARGS)]
    done = run_bounded(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *train], timeout=180)
    assert done.returncode == 0 and done.stdout == ""
    assert (tmp_path / "pretrain" / "finished.json").is_file()
