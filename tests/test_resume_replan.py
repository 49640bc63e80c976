"""A resumed run continues at the same sample of its epoch, whatever changed, and never loops.

Issue 14 item 1 (a bigger batch on resume hung forever, a smaller one repeated
and skipped samples) and issue 13 item 1 (resume on another number of
processes). What a user would check: which samples each run trained (noted by
tests/scripts/train_noting_keys.py), the losses it logged, its exit code and
its log lines, and that a signal ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import SCRIPTS, SMOKE, error_lines, losses, shard_keys, start, wait_until
from processes import BIN, REPO, descendants, free_port, run_bounded, run_ranks, running

from pegasus_dist.checksums import write_sums
from pegasus_dist.model.saved import latest_checkpoint
from pegasus_dist.training.hooks import STALLED
from pegasus_dist.training.state import read_state

pytestmark = pytest.mark.process
KEYS = SCRIPTS / "train_noting_keys.py"
BOUND_S = 60  # any run here that takes longer hangs: the resume never ended


def overrides(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.output_dir={runs}", f"train.max_steps={steps}",
            "wandb.mode=disabled", "train.log_every=1", *extra]


def train(nproc: int, out: Path, *args: str, script: Path = KEYS) -> subprocess.CompletedProcess:
    """The trainer on ``nproc`` processes (2: one gloo group), noting its samples into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    done = run_ranks([str(script), str(out), "--config", SMOKE, *args], nproc, BOUND_S)
    assert done.returncode == 0, done.stdout[-4000:]
    return done


def trained(*outs: Path) -> list[dict]:
    """Every micro-batch the runs noted, on every rank: epoch, step and keys."""
    return [json.loads(line) for out in outs for path in sorted(out.glob("keys-rank*.jsonl"))
            for line in path.read_text().splitlines()]


def keys_by_step(rows: list[dict]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for row in rows:
        found.setdefault(row["step"], []).extend(row["keys"])
    return {step: sorted(keys) for step, keys in found.items()}


def epoch_keys(rows: list[dict], epoch: int) -> Counter[str]:
    return Counter(key for row in rows if row["epoch"] == epoch for key in row["keys"])


@pytest.mark.parametrize(
    ("before", "after", "mode"),
    [
        # The issue: stopped at step 24 of 30 (batch 16), resumed with batch 32 (15 an epoch).
        (("data.batch_size=16", 24), ("data.batch_size=32", 27), "memory"),
        # Smaller: 160 of 470 done at batch 16; batch 24 leaves 12 x 24 + 22: 13 steps.
        (("data.batch_size=16", 10), ("data.batch_size=24", 23), "stream"),
    ],
)
def test_another_batch_on_resume_trains_each_sample_of_the_epoch_once(smoke_shards, tmp_path,
                                                                       before, after, mode):
    (batch_a, steps_a), (batch_b, steps_b) = before, after
    a, b = tmp_path / "a", tmp_path / "b"
    train(1, a, *overrides(smoke_shards, tmp_path, steps_a, batch_a, "train.checkpoint_every=3"))
    resumed = train(1, b, *overrides(smoke_shards, tmp_path, steps_b, batch_b, f"data.mode={mode}",
                                     "data.num_workers=1"))
    old, new = int(batch_a.split("=")[1]), int(batch_b.split("=")[1])
    done = old * steps_a
    assert (f"the global batch changed on resume: {old} -> {new}; lr {1e-3 * (old / 32) ** 0.5:.3g} -> "
            f"{1e-3 * (new / 32) ** 0.5:.3g} (optim.lr_scaling=sqrt); steps per epoch "
            f"{-(-470 // old)} -> {-(-470 // new)}; epoch 1 continues at sample {done} of 470"
            ) in resumed.stdout
    rows = trained(a, b)
    # Every sample once: none twice, none left.
    assert epoch_keys(rows, 0) == Counter(shard_keys(smoke_shards / "mix"))
    assert max(row["step"] for row in trained(b)) == steps_b  # the epoch ended at the planned step
    end = read_state(latest_checkpoint(tmp_path / "pretrain" / "checkpoints"))
    assert (end.epoch, end.samples_done, end.step, end.global_batch) == (1, 0, steps_b, new)


def test_a_position_past_the_end_of_the_epoch_fails_in_one_line(checkpointed_run):
    cmd = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *checkpointed_run.overrides,
           "train.max_steps=8"]
    checkpoint = checkpointed_run.pretrain / "checkpoints" / "step_00000006"
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps(state | {"samples_done": 100_000}))
    write_sums(checkpoint)  # as a run on a larger set would have written it: not damage
    done = run_bounded(cmd, BOUND_S)
    assert done.returncode == 2, done.stdout[-3000:]
    assert error_lines(done.stdout) == [
        f"error: {checkpoint}/state.json: samples_done 100000 is past the end of the epoch (470 "
        "samples in this shard set); train on the shard set it was written for, or move that "
        "checkpoint aside to resume from the one before"], done.stdout[-3000:]


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line_and_starts_a_run(checkpointed_run):
    """What versions before save_state wrote: optimizer.pt, rng/ and a batches_done. Resuming it
    would lose Adam or its place in the epoch; its weights still start a new run."""
    cmd = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *checkpointed_run.overrides,
           "train.max_steps=8"]
    checkpoint = checkpointed_run.pretrain / "checkpoints" / "step_00000006"
    state = json.loads((checkpoint / "state.json").read_text())
    del state["samples_done"], state["sums"]  # those versions wrote neither
    (checkpoint / "state.json").write_text(json.dumps(state | {"batches_done": 6}))
    (checkpoint / "optimizer.bin").rename(checkpoint / "optimizer.pt")
    (checkpoint / "SHA256SUMS").unlink()  # those versions wrote none
    (checkpoint / "rng").mkdir()
    torch.save({}, checkpoint / "rng" / "rank_00000.pt")
    for resume in ("auto", str(checkpoint)):
        done = run_bounded([*cmd, f"run.resume={resume}"], BOUND_S)
        assert done.returncode == 2, done.stdout[-3000:]
        assert error_lines(done.stdout) == [
            f"error: {checkpoint} was written by an older version of pegasus-dist (optimizer.pt, not "
            "optimizer.bin); resume it with that version, or start a new run from its weights with "
            f"train.init_from={checkpoint}"], done.stdout[-3000:]
    started = run_bounded([*cmd, "run.name=from-older", f"train.init_from={checkpoint}"], BOUND_S)
    assert started.returncode == 0, started.stdout[-3000:]
    assert f"initialised pretrain from {checkpoint}" in started.stdout


def test_a_global_batch_that_does_not_split_fails_in_one_line(smoke_shards, tmp_path):
    done = run_bounded([str(BIN / "pegasus-dist"), "train", "--config", SMOKE,
                        *overrides(smoke_shards, tmp_path, 3, "data.global_batch_size=15",
                                   "train.grad_accum_steps=2")], BOUND_S)
    assert done.returncode == 2
    assert error_lines(done.stdout) == [
        "error: data.global_batch_size=15 does not split evenly over 1 process(es) x "
        "train.grad_accum_steps=2; use a multiple of 2"], done.stdout[-3000:]
    assert not (tmp_path / "pretrain").exists()


# The global batch stays 16 on any number of processes; batch norm over the global batch.
SAME_GLOBAL = ("data.global_batch_size=16", "model.sync_batchnorm=true")


@pytest.fixture(scope="module")
def uninterrupted(smoke_shards, tmp_path_factory):
    """One process, 12 steps of 16: (run folder, keys by step)."""
    runs = tmp_path_factory.mktemp("uninterrupted")
    train(1, runs, *overrides(smoke_shards, runs, 12, *SAME_GLOBAL))
    return runs / "pretrain", keys_by_step(trained(runs))


@pytest.mark.parametrize(("nproc_before", "nproc_after"), [(1, 2), (2, 1)])
def test_resume_on_another_number_of_processes_matches_an_uninterrupted_run(
        smoke_shards, tmp_path, uninterrupted, nproc_before, nproc_after):
    reference, reference_keys = uninterrupted
    a, b = tmp_path / "a", tmp_path / "b"
    train(nproc_before, a, *overrides(smoke_shards, tmp_path, 6, *SAME_GLOBAL))
    resumed = train(nproc_after, b, *overrides(smoke_shards, tmp_path, 12, *SAME_GLOBAL))
    assert f"world_size={nproc_after}" in resumed.stdout
    assert "resumed from" in resumed.stdout and "96 of its 470 samples trained, step 6" in resumed.stdout
    assert "global batch changed" not in resumed.stdout
    # The same samples in every step, split over other processes: the same position of the plan.
    assert keys_by_step(trained(a, b)) == reference_keys
    # test_ddp's stated tolerance for 1 against 2 processes with global-batch batch norm.
    got, expected = losses(tmp_path / "pretrain"), losses(reference)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-5)


def test_two_processes_resume_on_two_with_another_batch(smoke_shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(2, a, *overrides(smoke_shards, tmp_path, 6, "data.batch_size=8"))
    # 96 of 470 done; 2 x 12 leaves 15 x 24 + 14: the epoch ends at step 22.
    resumed = train(2, b, *overrides(smoke_shards, tmp_path, 22, "data.batch_size=12"))
    assert resumed.stdout.count("the global batch changed on resume: 16 -> 24; lr 0.000707 -> 0.000866 "
                                "(optim.lr_scaling=sqrt); steps per epoch 30 -> 20; epoch 1 continues "
                                "at sample 96 of 470") == 1  # said once, by the main process
    assert epoch_keys(trained(a, b), 0) == Counter(shard_keys(smoke_shards / "mix"))
    assert read_state(latest_checkpoint(tmp_path / "pretrain" / "checkpoints")).epoch == 1


SCRAMBLED = """
import random, sys
import numpy as np, torch
from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.loop import main
def scramble(trainer):
    # Once started: the global generators in a state no run has had; training must draw from none of them.
    random.seed(12345); np.random.seed(12345); torch.manual_seed(12345)
main(sys.argv[2:], hooks=Hooks(after_start=[scramble]))
"""


def test_resuming_needs_no_random_state(smoke_shards, tmp_path, uninterrupted):
    """Checkpoints keep no RNG state (save_state's random_states_<rank>.pkl are deleted): a resume
    with scrambled global generators is bit-equal.

    Streamed by a loader process this time: its batches are the memory mode's, to the byte.
    """
    script = tmp_path / "scrambled.py"
    script.write_text(SCRAMBLED)
    streamed = ("data.mode=stream", "data.num_workers=1")
    train(1, tmp_path / "a", *overrides(smoke_shards, tmp_path, 6, *SAME_GLOBAL, *streamed))
    assert not list((tmp_path / "pretrain").rglob("random_states_*"))  # save_state wrote them: dropped
    train(1, tmp_path / "b", *overrides(smoke_shards, tmp_path, 12, *SAME_GLOBAL, *streamed), script=script)
    assert losses(tmp_path / "pretrain") == losses(uninterrupted[0])  # to the bit, every step


def ended_within(proc: subprocess.Popen, seconds: float) -> str:
    """The output of ``proc``, which must end within ``seconds`` (killed, and the test failed, if not)."""
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {seconds}s after the signal:\n"
                             f"{proc.communicate()[0][-3000:]}") from None
    return out


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in descendants(launcher.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and str(KEYS).encode() in command:
            return pid
    raise AssertionError(f"no rank {rank} below {launcher.pid}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_sigterm_stops_within_seconds_with_a_checkpoint_though_no_sync_point_comes(
        smoke_shards, tmp_path, nproc):
    """log_every and checkpoint_every far away, epochs that never end: SIGTERM to one rank only."""
    out = tmp_path / "keys"
    out.mkdir()
    args = ["--config", SMOKE, *overrides(smoke_shards, tmp_path, 10**6, "data.batch_size=8",
                                          "train.log_every=1000000", "train.checkpoint_every=1000000",
                                          "train.epochs=100000")]
    launch = ([sys.executable] if nproc == 1 else
              [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch/cpu-2proc-gloo.yaml"),
               "--main_process_port", str(free_port())])
    proc = start([*launch, str(KEYS), str(out), *args])
    try:
        wait_until(lambda: len(trained(out)) >= 5 * nproc, proc, BOUND_S)  # training, far from any sync point
        target = proc.pid if nproc == 1 else rank_pid(proc, nproc - 1)
        seen = max(row["step"] for row in trained(out))
        os.kill(target, signal.SIGTERM)
        output = ended_within(proc, 20)
    finally:
        for pid in descendants(proc.pid):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == (75 if nproc == 1 else 1), output[-3000:]  # accelerate makes 75 a 1
    step = int(output.split("stopped by signal at step ")[1].split(";")[0])
    assert seen <= step <= seen + 3, output[-3000:]  # within two steps of the signal, give or take one
    assert latest_checkpoint(tmp_path / "pretrain" / "checkpoints").name == f"step_{step:08d}"


@pytest.mark.parametrize(("where", "signals"), [("in the loop", 2), ("in the final checkpoint", 1)])
def test_a_run_stuck_in_a_save_ends_at_once_on_sigterm(smoke_shards, tmp_path, where, signals):
    """A save that never ends (a hung filesystem): outside the loop one SIGTERM ends the run at once,
    inside it the first asks for a checkpoint and the second ends it."""
    steps, every = (6, "3") if where == "in the loop" else (2, "0")
    stall = {"PEGASUS_FAULT": f"stall-save:step={3 if where == 'in the loop' else 2}"}
    proc = start([sys.executable, str(REPO / "pegasus_dist/train.py"),
                  "--config", SMOKE, *overrides(smoke_shards, tmp_path, steps, "data.batch_size=16",
                                                f"train.checkpoint_every={every}")], stall)
    try:
        wait_until(lambda: (tmp_path / "pretrain" / STALLED).exists(), proc, BOUND_S)
        for _ in range(signals - 1):
            proc.send_signal(signal.SIGTERM)
            time.sleep(2)
            assert proc.poll() is None  # the first one waits for the checkpoint in progress
        proc.send_signal(signal.SIGTERM)
        out = ended_within(proc, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGTERM, out[-3000:]
    why = "again" if where == "in the loop" else "outside the training loop"
    assert f"received SIGTERM {why}: exiting at once, without a checkpoint" in out
