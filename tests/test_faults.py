"""Fault injection: each test says what was lost and what was kept.

Faults go into the real entry points through the trainer's fault plan
(``PEGASUS_FAULT``, pegasus_dist/training/hooks.py), or in process through
its hooks.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SMOKE,
    TINY_ARGS,
    cli_here,
    losses,
    overrides,
    start,
    training_rows,
    training_steps,
    wait_until,
)
from processes import BIN, REPO, Ranks, free_port, machine_env, popen, run_bounded, run_ranks
from safetensors.torch import load_file

from pegasus_dist.config import PrepareConfig, load_config
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import ConfigError
from pegasus_dist.evaluation.heldout import leak
from pegasus_dist.model.saved import latest_checkpoint, list_checkpoints
from pegasus_dist.training.faults import TrainingError
from pegasus_dist.training.hooks import STALLED, Hooks, fault_plan
from pegasus_dist.training.lock import LOCK_FILE
from pegasus_dist.training.loop import train
from pegasus_dist.training.start import _init_source

pytestmark = pytest.mark.process
TRAIN = str(REPO / "pegasus_dist/train.py")


def fault(plan: str) -> dict[str, str]:
    """The environment that gives a run the fault plan ``plan``."""
    return {"PEGASUS_FAULT": plan}


def tiny(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    """helpers.overrides with the tiny model: a step in milliseconds."""
    return overrides(shards, runs, steps, *TINY_ARGS, *extra)


def train_cmd(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    return [str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *tiny(shards, runs, steps, *extra)]


@pytest.mark.parametrize("extra", [[], ["loss.acai_weight=100", "loss.patch_gan_weight=0.8",
                                        "loss.patch_gan_adaptive=true", "loss.perceptual_weight=30"]],
                         ids=["vae", "acai+adaptive_patch_gan+perceptual"])  # the gradients they take
def test_sigkill_mid_epoch_then_resume_gives_bit_equal_losses(smoke_shards, perceptual_network, tmp_path,
                                                              extra):
    extra = [*extra, f"loss.perceptual_network={perceptual_network}"] if extra else []
    # 470 samples / 16 = 30 batches an epoch: steps 1..24 stay inside epoch 1.
    ref = run_bounded(train_cmd(smoke_shards, tmp_path / "ref", 24, *extra), timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:]

    cmd = train_cmd(smoke_shards, tmp_path / "cut", 24, "train.checkpoint_every=8", *extra)
    # The killed run is slowed down (100 ms a step, same numbers) so the kill lands mid-run.
    proc = start(cmd, fault("slow:ms=100"))
    run = tmp_path / "cut" / "pretrain"
    wait_until(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 13, proc, 120)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run / "checkpoints").name in ("step_00000008", "step_00000016")
    resumed = run_bounded(cmd, timeout=300)  # run.resume=auto is the default
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(run) == losses(tmp_path / "ref" / "pretrain")  # to the bit, every step
    if extra:  # the adversaries too: their losses, the adaptive weight and their final weights
        for key in ("pretrain/acai_critic", "pretrain/patch_gan_discriminator",
                    "pretrain/patch_gan_adaptive_weight", "pretrain/perceptual"):
            logged = [{r["step"]: r[key] for r in training_rows(folder)}
                      for folder in (run, tmp_path / "ref" / "pretrain")]
            assert logged[0] == logged[1], key
        weights = [load_file(folder / "checkpoints/step_00000024/model_1.safetensors")
                   for folder in (run, tmp_path / "ref" / "pretrain")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_two_process_resume_matches_an_uninterrupted_run(smoke_shards, tmp_path):
    """2 gloo ranks killed mid-epoch and resumed: stated tolerance 1e-6 relative on every loss."""
    def two_ranks(runs: Path) -> list[str]:
        return [TRAIN, "--config", SMOKE, *tiny(smoke_shards, runs, 12, "train.checkpoint_every=4",
                                                 "data.batch_size=8")]

    ref = run_ranks(two_ranks(tmp_path / "ref"), 2, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:]
    run = tmp_path / "cut" / "pretrain"
    # The killed run is slowed down (200 ms a step, same numbers) so the kill lands mid-run.
    ranks = Ranks(two_ranks(tmp_path / "cut"), 2, fault("slow:ms=200"))
    wait_until(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 6, ranks, 180)
    ranks.kill()
    ranks.wait()
    resumed = run_ranks(two_ranks(tmp_path / "cut"), 2, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    got, expected = losses(run), losses(tmp_path / "ref" / "pretrain")
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected, rel=1e-6)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(smoke_shards, tmp_path):
    cmd = [sys.executable, TRAIN, "--config", SMOKE,
           *tiny(smoke_shards, tmp_path, 10, "train.checkpoint_every=4")]
    proc = start(cmd, fault("stall-save:step=8"))
    run = tmp_path / "pretrain"
    wait_until(lambda: (run / STALLED).exists(), proc, 120)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004"]
    assert (run / "checkpoints" / ".tmp-step_00000008").is_dir()  # the half-written save
    load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")  # still valid
    done = run_bounded(train_cmd(smoke_shards, tmp_path, 10, "train.checkpoint_every=4"), 300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "resumed from" in done.stdout and "step 4" in done.stdout
    assert not (run / "checkpoints" / ".tmp-step_00000008").exists()  # cleaned by pruning


def launch2(plan: str, args: list[str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """train.py through ``accelerate launch`` on 2 gloo processes with the fault plan ``plan``: the
    launcher ends the ranks a fault leaves behind. Its outcome and its seconds."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file",
           str(REPO / "launch/cpu-2proc-gloo.yaml"), TRAIN, *args]
    started = time.monotonic()
    done = run_bounded(cmd, timeout, env=fault(plan))
    return done, time.monotonic() - started


def ranks2(plan: str, args: list[str]) -> subprocess.CompletedProcess:
    """train.py on 2 ranks without a launcher (:class:`processes.Ranks`), with the fault plan ``plan``:
    every rank must end by itself."""
    return run_ranks([TRAIN, *args], 2, timeout=240, env=fault(plan))


def test_nan_on_one_rank_stops_every_rank_naming_step_and_checkpoint(smoke_shards, tmp_path):
    done = ranks2("nan:step=6:rank=1",
                  ["--config", SMOKE, *tiny(smoke_shards, tmp_path, 10, "train.checkpoint_every=4")])
    assert done.returncode != 0
    assert "error: non-finite loss at step 6 (epoch 1, batch 6) on rank(s) [1]" in done.stdout
    assert done.stdout.count("error: ") == 1  # every rank found it at once: the main process says it
    assert f"last good checkpoint: {tmp_path}/pretrain/checkpoints/step_00000004" in done.stdout
    assert latest_checkpoint(tmp_path / "pretrain" / "checkpoints").name == "step_00000004"


def test_nan_found_at_the_next_sync_point_is_never_checkpointed(smoke_shards, tmp_path):
    # Sync points: steps 4 (checkpoint), 5 (log), 8 (checkpoint). The NaN of step 6
    # is found at step 8, before its checkpoint is written.
    done = ranks2("nan:step=6:rank=1", ["--config", SMOKE,
                                        *tiny(smoke_shards, tmp_path, 12, "train.log_every=5",
                                              "train.checkpoint_every=4")])
    assert done.returncode != 0
    assert ("error: non-finite loss at step 6 (epoch 1, batch 6) on rank(s) [1] "
            "(found at step 8)") in done.stdout, done.stdout[-3000:]
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    assert f"last good checkpoint: {checkpoints}/step_00000004" in done.stdout
    assert [c.name for c in list_checkpoints(checkpoints)] == ["step_00000004"]
    assert not (checkpoints / ".tmp-step_00000008").exists()  # not even begun
    assert [row["step"] for row in training_rows(tmp_path / "pretrain")] == [5]  # no NaN logged


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_steps_wait_for_the_device_only_at_sync_points(smoke_shards, tmp_path, mode):
    """20 steps, log_every=5: the ranks exchange anything only at steps 5, 10, 15 and 20.

    There they agree on faults (one gather and one host read), and once more at
    the end, and reduce the logged window. Only train.on_nonfinite=skip also
    gathers every micro-batch's loss, as documented.
    """
    gathers: list[int] = []  # state.step at each call
    reductions: list[int] = []

    def count_collectives(trainer) -> None:
        for name, calls in (("gather", gathers), ("reduce", reductions)):
            real = getattr(trainer.accelerator, name)

            def counted(*args, real=real, calls=calls, **kwargs):
                calls.append(trainer.state.step)
                return real(*args, **kwargs)

            setattr(trainer.accelerator, name, counted)  # this trainer's accelerator only

    train(load_config(SMOKE, tiny(smoke_shards, tmp_path, 20, "train.log_every=5",
                                       f"train.on_nonfinite={mode}")),
          hooks=Hooks(after_start=[count_collectives]))
    at_sync_points = [5, 10, 15, 20, 20]  # no epoch ends or checkpoints within 20 steps
    each_micro_batch = list(range(20)) if mode == "skip" else []  # before its step's update
    assert sorted(gathers) == sorted(at_sync_points + each_micro_batch)
    assert set(reductions) == {5, 10, 15, 20}


def test_a_start_up_that_fails_leaves_the_callers_signal_handlers(smoke_shards, tmp_path):
    """A failed start in a process that goes on (a notebook, this test):
    a SIGTERM must do what it did before, not call a stopped trainer's "checkpoint and stop",
    which processes forked later (prepare's shard writers) would inherit too."""
    def fail(_trainer) -> None:
        raise RuntimeError("start-up failed after the stop handlers were installed")

    before = {sent: signal.getsignal(sent) for sent in signal.valid_signals()}
    with pytest.raises(RuntimeError, match="start-up failed"):
        train(load_config(SMOKE, tiny(smoke_shards, tmp_path, 5)), hooks=Hooks(after_start=[fail]))
    changed = [signal.Signals(sent).name for sent, was in before.items() if signal.getsignal(sent) != was]
    assert changed == [], f"a failed start left handlers for {changed}"


def test_a_malformed_fault_plan_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PEGASUS_FAULT", "nan:step=three")
    with pytest.raises(ConfigError, match="PEGASUS_FAULT: fault 'nan:step=three': step=three is not a whole"):
        train(load_config(SMOKE, [f"run.output_dir={tmp_path}"]))  # before anything starts
    assert not (tmp_path / "pretrain").exists()
    with pytest.raises(ConfigError, match="unknown kind 'nun'; one of nan, inf, kill"):
        fault_plan("nun:step=3")
    with pytest.raises(ConfigError, match="it needs step="):
        fault_plan("nan:rank=1")
    with pytest.raises(ConfigError, match="step=x is not a whole number"):
        fault_plan("kill:step=x")
    with pytest.raises(ConfigError, match="'when=3' is not one of rank=, step="):
        fault_plan("nan:when=3")
    with pytest.raises(ConfigError, match="at=later is not a start-up stage"):
        fault_plan("fail:at=later")
    assert fault_plan("nan:step=3:rank=7").on_loss == []  # another rank's fault: nothing here
    assert len(fault_plan("slow:ms=1, nan:step=2").on_loss) == 1


@pytest.mark.parametrize("sent", [signal.SIGHUP, signal.SIGINT], ids=["dropped ssh", "Ctrl-C"])
def test_a_stop_signal_checkpoints_within_two_steps_and_exits_75(smoke_shards, tmp_path, sent):
    cmd = ["--config", SMOKE, *tiny(smoke_shards, tmp_path, 24, "train.log_every=5")]
    # Slowed down (100 ms a step, same numbers) so that the signal lands mid-run.
    proc = start([sys.executable, TRAIN, *cmd], fault("slow:ms=100"))
    run = tmp_path / "pretrain"
    wait_until(lambda: (run / "metrics.jsonl").exists(), proc, 120)  # step 5 logged
    proc.send_signal(sent)  # after step 5: the stop need not wait for step 10's sync point
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped = latest_checkpoint(run / "checkpoints")
    step = int(stopped.name.removeprefix("step_"))
    assert 5 < step < 24, out[-3000:]
    assert f"stopped by signal at step {step}" in out
    resumed = run_bounded(train_cmd(smoke_shards, tmp_path, 24, "train.log_every=5"), 300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {stopped}" in resumed.stdout


def test_nan_skipped_and_counted_when_configured(smoke_shards, tmp_path):
    done = ranks2("nan:step=3:rank=0", ["--config", SMOKE,
                                        *tiny(smoke_shards, tmp_path, 6, "train.on_nonfinite=skip")])
    assert done.returncode == 0, done.stdout[-3000:]
    rows = training_rows(tmp_path / "pretrain")
    assert rows[-1]["pretrain/nonfinite_skipped_steps"] == 1
    assert "pretrain/loss" not in rows[2]  # the skipped step logs no loss ...
    assert all(math.isfinite(row["pretrain/loss"]) for row in rows if row["step"] != 3)
    weights = load_file(tmp_path / "pretrain/checkpoints/step_00000006/model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_rank_that_dies_brings_every_rank_down_quickly(smoke_shards, tmp_path):
    done, seconds = launch2("kill:step=3:rank=1", ["--config", SMOKE, *tiny(smoke_shards, tmp_path, 50)])
    assert done.returncode != 0
    assert seconds < 60, f"took {seconds:.0f}s"
    assert not (tmp_path / "pretrain" / "samples").exists()  # nothing pretended to finish
    # The survivor says it in one line, not with the transport's traceback through the step.
    assert f'File "{REPO / "pegasus_dist"}' not in done.stdout, done.stdout[-4000:]
    assert "error: lost another rank at step 3 (epoch 1) (Connection" in done.stdout, done.stdout[-4000:]


def test_a_rank_that_stalls_is_named_by_the_survivor_within_the_timeout(smoke_shards, tmp_path):
    """Alive but silent (SIGSTOP: a stalled node, a hung filesystem): the survivor's collective times out
    and it ends in one line. The ranks start as torchrun starts them, without it: torchrun would then end
    the stopped rank (SIGTERM, and SIGKILL 30 s later, a wait torch does not let a launch shorten)."""
    port, procs = free_port(), []
    for rank in (0, 1):
        procs.append(popen(
            [sys.executable, TRAIN, "--config", SMOKE,
             *tiny(smoke_shards, tmp_path, 50, "train.collective_timeout_s=20")],
            env=machine_env(rank, 2, port) | {"PEGASUS_FAULT": "kill:step=3:rank=1:signal=STOP"}))
    started = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=90)
        seconds = time.monotonic() - started
        assert procs[1].poll() is None  # still stopped: only the survivor ended
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert procs[0].returncode == TrainingError.exit_code, out[-4000:]
    assert seconds < 60, f"took {seconds:.0f}s"
    assert not (tmp_path / "pretrain" / "samples").exists()
    assert f'File "{REPO / "pegasus_dist"}' not in out, out[-4000:]
    assert ("error: another rank did not answer within train.collective_timeout_s at step 3 (epoch 1): "
            "it is stalled") in out, out[-4000:]


def test_a_rank_stalled_in_the_final_save_is_one_line_on_the_rank_that_waits_for_it(smoke_shards, tmp_path):
    """The same silence outside the training loop: the main process hangs in the final checkpoint, and
    rank 1's broadcast there times out. (A timeout in start-up's collectives takes the same path in
    loop.train; no fault plan stalls start-up, so it is not injected here.)"""
    done, seconds = launch2("stall-save:step=6", [
        "--config", SMOKE, *tiny(smoke_shards, tmp_path, 6, "train.collective_timeout_s=15")])
    assert done.returncode != 0
    assert seconds < 90, f"took {seconds:.0f}s"
    assert ("error: another rank did not answer within train.collective_timeout_s at the end of the phase "
            "(step 6)") in done.stdout, done.stdout[-4000:]
    assert f'File "{REPO / "pegasus_dist"}' not in done.stdout, done.stdout[-4000:]


def test_a_corrupt_shard_stops_training_naming_the_file(smoke_shards, tmp_path, capsys):
    """`pegasus-dist train` in this process (cli_here): the console script's exit code and lines."""
    shards = tmp_path / "shards"
    shutil.copytree(smoke_shards, shards)
    bad = load_manifest(shards / "mix").shard_paths[2]
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated

    def train_here(runs: Path, steps: int, *extra: str) -> tuple[int, str]:
        return cli_here(capsys, "train", "--config", SMOKE, *tiny(shards, runs, steps, *extra))

    for mode, workers in (("stream", "0"), ("stream", "2"), ("memory", "0")):
        code, out = train_here(tmp_path / f"{mode}{workers}", 200, f"data.mode={mode}",
                               f"data.num_workers={workers}")
        assert code == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"shard {bad}" in errors[0], out[-3000:]
    # The documented option: skip bad samples, count them, finish the epoch.
    run = tmp_path / "skip"
    code, out = train_here(run, 30, "data.on_bad_sample=skip", "data.num_workers=2")
    assert code == 0, out[-3000:]
    last = training_rows(run / "pretrain")[-1]
    # One full epoch, each sample once: all 50 of the changed shard, not only those past the cut.
    assert last["pretrain/bad_samples_skipped"] == 50
    assert f"shard {bad} does not match the sha256 of its manifest" in out
    bad.unlink()
    code, out = train_here(tmp_path / "missing", 5)
    assert code == 2 and f"error: shard {bad} listed in" in out, out[-3000:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # The config's own checks (train.epochs=-1, ...) are tested in this process, in test_config.
        ("data.shard_set=nowhere", "no shard set at"),
        ("train.mixed_precision=fp16", "fp16 needs a GPU"),
        ("train.ddp_bf16_gradients=true", "train.ddp_bf16_gradients=true needs GPUs (NCCL)"),
        ("train.init_from=/nonexistent", "neither a checkpoint"),
        # More images a step than the set holds: refused, not one step an epoch at the wrong lr.
        ("data.batch_size=100000", "mix holds 470 samples; lower data.batch_size to 470 or less"),
    ],
)
def test_bad_configuration_exits_2_before_training(smoke_shards, tmp_path, extra, message, capsys):
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path, 5, extra)[1:])
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out[-2000:]
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


@pytest.mark.process  # the shared checkpointed run is made by a process
def test_init_from_a_run_that_has_not_finished_warns_naming_the_checkpoint_it_starts_from(checkpointed_run,
                                                                                          tmp_path, caplog):
    """A finetune started while its pretraining still runs, or after it was killed, would otherwise
    start from whatever checkpoint is newest, without a word; and one on shards prepared again since,
    whose held-out images its weights may have seen."""
    run = checkpointed_run.pretrain

    def source(init_from: Path, *extra: str) -> Path:
        return _init_source(load_config(SMOKE, [*checkpointed_run.overrides, f"train.init_from={init_from}",
                                                *extra]), main=True)

    with caplog.at_level(logging.WARNING, logger="pegasus_dist.training.start"):
        assert source(run) == run / "checkpoints" / "step_00000006"
        assert not caplog.records  # it finished: its grids and evaluation were written
        (run / "finished.json").unlink()
        assert source(run).name == "step_00000006"
        assert f"train.init_from: {run} has not finished" in caplog.text, caplog.text
        assert "(no finished.json for its newest checkpoint, step_00000006)" in caplog.text
        caplog.clear()
        assert source(run / "checkpoints" / "step_00000003").name == "step_00000003"
        assert not caplog.records  # a checkpoint named is the user's choice
        # Shards prepared again since that run trained: another held-out split, maybe of its images.
        prepare(PrepareConfig(out=str(tmp_path / "new"), sources=["synthetic:480"], shard_size=50, seed=1),
                "tests")
        step_3 = run / "checkpoints" / "step_00000003"
        source(step_3, f"data.shards={tmp_path / 'new'}")
        assert f"train.init_from {step_3}: {tmp_path / 'new' / 'eval'} is of shard generation" in caplog.text
        assert "this phase's held-out metrics may count them" in caplog.text, caplog.text


def test_a_run_folder_that_cannot_be_written_is_one_line(smoke_shards, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path, 5,
                                            f"run.output_dir={tmp_path}/a-file/runs")[1:])
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == [
        f"error: cannot write the run folder {tmp_path}/a-file/runs/pretrain: Not a directory; make it "
        "writable, or set run.output_dir to a folder that is"], out[-2000:]
    assert "Traceback" not in out

    (tmp_path / "b" / "pretrain").mkdir(parents=True)
    (tmp_path / "b" / "pretrain" / "checkpoints").write_text("")  # read as none: a run from scratch
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path / "b", 5)[1:])
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == [f"error: {tmp_path}/b/pretrain/checkpoints is not a folder; move it away "
                                    "so that the run can keep its checkpoints there"], out[-2000:]

    (tmp_path / "pretrain" / "config.yaml").mkdir(parents=True)  # the file the run saves its config to
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path, 5)[1:])
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == [
        f"error: cannot write {tmp_path}/pretrain/config.yaml: Is a directory; make it a writable file "
        "(move away what is there), or set run.output_dir to another folder"], out[-2000:]
    assert "Traceback" not in out
    # A failed start leaves the folder to the next run, even in a process that goes on (a notebook).
    with open(tmp_path / "pretrain" / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a run holds it


def test_a_checkpoint_of_another_model_shape_exits_2(smoke_shards, tmp_path, checkpointed_run, capsys):
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path, 2, "model.latent_dim=4",
                                            f"train.init_from={checkpointed_run.pretrain}")[1:])
    assert code == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has shape" in errors[0] and "another shape" in errors[0], out[-2000:]
    assert "Traceback" not in out
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_the_wandb_key_never_reaches_the_run_folder(smoke_shards, tmp_path):
    secret = "pegasus-test-secret-0123456789abcdef0123"
    cmd = train_cmd(smoke_shards, tmp_path, 2)
    cmd[cmd.index("wandb.mode=disabled")] = "wandb.mode=offline"
    done = run_bounded(cmd, timeout=180, env={"WANDB_API_KEY": secret})
    assert done.returncode == 0, done.stdout[-2000:]
    assert secret not in done.stdout
    for path in (tmp_path / "pretrain").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_resume_continues_the_same_wandb_run_and_the_same_phase(smoke_shards, tmp_path):
    cmd = train_cmd(smoke_shards, tmp_path, 2)
    cmd[cmd.index("wandb.mode=disabled")] = "wandb.mode=offline"
    for steps in ("2", "4"):  # the second invocation resumes from the first one's checkpoint
        cmd[cmd.index(next(a for a in cmd if a.startswith("train.max_steps=")))] = (
            f"train.max_steps={steps}")
        done = run_bounded(cmd, timeout=180, env={"WANDB_API_KEY": ""})
        assert done.returncode == 0, done.stdout[-2000:]
    runs = sorted((tmp_path / "pretrain" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1  # one run id
    assert "resumed from" in done.stdout

    # A finetune run never resumes from a pretrain checkpoint: it says how to start from one.
    finetune = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE,
                *tiny(smoke_shards, tmp_path, 2, "train.phase=finetune")]
    done = run_bounded(finetune, timeout=120)
    assert done.returncode == 2
    assert "is a pretrain checkpoint but this run is finetune" in done.stdout
    assert "train.init_from=" in done.stdout


def test_a_step_out_of_memory_is_one_line_naming_the_batch_and_the_fix(smoke_shards, tmp_path, capsys,
                                                                        monkeypatch):
    """The fault raises what CUDA raises (torch.OutOfMemoryError) inside step 3."""
    monkeypatch.setenv("PEGASUS_FAULT", "oom:step=3")
    code, out = cli_here(capsys, *train_cmd(smoke_shards, tmp_path, 5)[1:])
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 3 and errors == [
        "error: out of memory at step 3 (epoch 1) (CUDA out of memory. Tried to allocate 2.00 GiB (an "
        "injected fault, PEGASUS_FAULT)); global batch 16 = per-process batch 16 x 1 process(es) x 1 "
        "accumulation step(s); lower data.batch_size (data.batch_size=8 train.grad_accum_steps=2 keeps "
        "the global batch) or use train.mixed_precision=bf16"], out[-3000:]
    assert "Traceback" not in out


def test_a_loader_worker_killed_mid_step_is_one_line_and_the_same_command_resumes(smoke_shards, tmp_path):
    """A loader worker SIGKILLed (as by the kernel's OOM killer) under step 6; torch raises it from
    its SIGCHLD handler wherever the main process is."""
    cmd = train_cmd(smoke_shards, tmp_path, 8, "data.mode=stream", "data.num_workers=1",
                    "train.checkpoint_every=4")
    killed = run_bounded(cmd, 120, env={"PEGASUS_FAULT": "kill-worker:step=6"})
    errors = [line for line in killed.stdout.splitlines() if line.startswith("error: ")]
    assert killed.returncode == 3 and len(errors) == 1, killed.stdout[-3000:]
    # Seen in step 6 from torch's SIGCHLD handler ("is killed by signal: Killed"), or in step 7 when
    # the next batch is due first ("exited unexpectedly"): which depends on where the signal lands.
    assert re.match(r"error: a data loader process died at step [67] \(epoch 1\) \(DataLoader worker "
                    r"\(pid.*\): the kernel's out-of-memory killer", errors[0]), errors
    assert "Traceback" not in killed.stdout
    resumed = run_bounded(cmd, 120)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert training_steps(tmp_path / "pretrain") == list(range(1, 9))


def test_host_memory_running_out_in_a_step_or_its_batch_is_the_same_one_line(smoke_shards, tmp_path):
    """NumPy's own refusal (a petabyte), where the loader assembles a batch or a step allocates."""
    def refuse(trainer, _batch) -> None:
        if trainer.state.step + 1 == 3:
            np.empty(2**50, dtype=np.uint8)

    with pytest.raises(TrainingError) as stopped:
        train(load_config(SMOKE, tiny(smoke_shards, tmp_path, 5)), Hooks(before_micro_batch=[refuse]))
    assert str(stopped.value).startswith(  # and the fix, as for CUDA's above
        "out of memory at step 3 (epoch 1) (Unable to allocate 1.00 PiB for an array with shape "
        "(1125899906842624,) and data type uint8); global batch 16 = per-process batch 16 x 1 process(es)")


def test_the_cpu_allocator_running_out_is_read_as_out_of_memory():
    from pegasus_dist.training.faults import out_of_memory

    try:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the allocator refuses, as when memory runs out
    except RuntimeError as err:
        refused = err
    oom = out_of_memory(refused, "step 7 (epoch 2)", "global batch 64", 64)
    assert oom is not None and str(oom).startswith("out of memory at step 7 (epoch 2) (")
    assert "lower data.batch_size (data.batch_size=32 train.grad_accum_steps=2" in str(oom)
    assert out_of_memory(RuntimeError("shape mismatch"), "step 1", "global batch 64", 64) is None


def test_metrics_that_cannot_be_written_end_the_run_in_one_line(smoke_shards, tmp_path):
    """metrics.jsonl made unwritable once the run has started (here a folder in its place; a
    full disk fails the same append): the error names the step, the file and the fix."""
    hooks = Hooks(after_start=[lambda trainer: trainer.metrics.path.mkdir()])
    with pytest.raises(TrainingError) as stopped:
        train(load_config(SMOKE, tiny(smoke_shards, tmp_path, 6, "train.log_every=2")), hooks)
    path = tmp_path / "pretrain" / "metrics.jsonl"
    assert str(stopped.value).startswith(f"cannot append step 2 to {path}: Is a directory (")
    assert str(stopped.value).endswith("MB free there); free space or make it writable, then run the same "
                                       "command to resume from the last checkpoint")


def test_shards_prepared_again_while_a_phase_trains_are_not_taken_for_its_held_out_set(smoke_shards, tmp_path,
                                                                                      caplog):
    """A `prepare` into the folder while the phase trains (it keeps reading the set it opened) draws
    another held-out split, which may hold images the phase trained on: the end of the phase says
    so and writes no held-out metrics, and `leak` is what `pegasus-dist eval` warns with too."""
    shards = tmp_path / "shards"
    shutil.copytree(smoke_shards, shards, symlinks=True)
    trained_on = f"mix@{load_manifest(shards / 'mix').generation}"
    assert leak(trained_on, shards / "eval") is None

    def prepare_again(trainer) -> None:
        prepare(PrepareConfig(out=str(shards), sources=["synthetic:480"], shard_size=50, seed=1), "tests")

    with caplog.at_level(logging.WARNING, logger="pegasus_dist.training.finish"):
        train(load_config(SMOKE, tiny(shards, tmp_path / "runs", 4)), Hooks(after_start=[prepare_again]))
    now = load_manifest(shards / "eval").generation
    assert now != trained_on.partition("@")[2]
    expected = (f"{shards / 'eval'} is of shard generation {now}, but the model trained on {trained_on}: "
                "the shards were prepared again since, so held-out images may be ones it trained on; "
                "skipping the held-out evaluation and the quality scores")
    assert expected in caplog.text, caplog.text
    run = tmp_path / "runs" / "pretrain"
    assert (run / "samples" / "pegasus.png").is_file() and not (run / "eval").exists()
    assert leak("", shards / "eval") is None  # a checkpoint of a version that recorded no generation
