"""Progress while training: a bar on a terminal, plain log lines in logs that are files or pipes."""

from __future__ import annotations

import io
import logging
import re

import pytest
from helpers import TINY_ARGS
from processes import BIN, REPO, run_bounded

from pegasus_dist.training.progress import Progress


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train(progress: Progress, clock: Clock, epoch: int, batches: int, first_step: int,
          seconds_per_step: float = 7.0, images: int = 64, start_batch: int = 0) -> None:
    with progress.epoch(epoch, start_batch) as shown:
        for i in range(batches):
            clock.now += seconds_per_step
            shown.update(first_step + i, images)


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pegasus_dist.training.progress"]


def test_without_a_terminal_a_line_every_30_s_and_at_each_epoch_end(caplog):
    caplog.set_level(logging.INFO, logger="pegasus_dist.training.progress")
    clock, stream = Clock(), io.StringIO()
    progress = Progress("pretrain", epochs=2, batches_per_epoch=10, max_steps=0, enabled=True,
                        stream=stream, clock=clock)
    train(progress, clock, epoch=0, batches=10, first_step=1)
    train(progress, clock, epoch=1, batches=10, first_step=11)
    # 7 s a step of 64 images: lines at 35 s and 70 s (the epoch's end, said once), 105 s, 140 s
    assert progress_lines(caplog) == [
        "pretrain: epoch 1/2, batch 5/10, step 5/20, 9 images/s, ETA 0:01:45",
        "pretrain: epoch 1/2, batch 10/10, step 10/20, 9 images/s, ETA 0:01:10",
        "pretrain: epoch 2/2, batch 5/10, step 15/20, 9 images/s, ETA 0:00:35",
        "pretrain: epoch 2/2, batch 10/10, step 20/20, 9 images/s, ETA 0:00:00",
    ]
    assert stream.getvalue() == ""  # no bar drawn


def test_a_resumed_epoch_and_max_steps_end_with_a_line_where_they_stop(caplog):
    caplog.set_level(logging.INFO, logger="pegasus_dist.training.progress")
    clock = Clock()
    progress = Progress("finetune", epochs=3, batches_per_epoch=10, max_steps=14, enabled=True,
                        stream=io.StringIO(), clock=clock)
    train(progress, clock, epoch=1, batches=4, first_step=11, start_batch=6, seconds_per_step=1)
    assert progress_lines(caplog) == [
        "finetune: epoch 2/3, batch 10/10, step 14/14, 64 images/s, ETA 0:00:00"]


def test_with_gradient_accumulation_steps_and_eta_count_optimizer_steps(caplog):
    caplog.set_level(logging.INFO, logger="pegasus_dist.training.progress")
    clock = Clock()
    progress = Progress("pretrain", epochs=2, batches_per_epoch=8, max_steps=0, enabled=True,
                        stream=io.StringIO(), clock=clock, grad_accum_steps=4)
    with progress.epoch(0, 0) as shown:
        for batch in range(1, 9):  # an optimizer step every 4 batches: 2 steps an epoch
            clock.now += 7.0
            shown.update(batch // 4, 64)
    # 7 s a batch; at batch 5 the steps left (2 to 4 of 4) are 12 batches, at the epoch's end 8
    assert progress_lines(caplog) == [
        "pretrain: epoch 1/2, batch 5/8, step 1/4, 9 images/s, ETA 0:01:24",
        "pretrain: epoch 1/2, batch 8/8, step 2/4, 9 images/s, ETA 0:00:56",
    ]


def test_on_a_terminal_a_bar_and_no_lines_and_other_ranks_show_nothing(caplog):
    caplog.set_level(logging.INFO, logger="pegasus_dist.training.progress")
    terminal = Terminal()
    progress = Progress("pretrain", epochs=2, batches_per_epoch=10, max_steps=0, enabled=True,
                        stream=terminal, clock=Clock())
    train(progress, progress.clock, epoch=0, batches=10, first_step=1)
    assert "pretrain epoch 1/2" in terminal.getvalue() and "10/10" in terminal.getvalue()
    assert progress_lines(caplog) == []

    for stream in (Terminal(), io.StringIO()):
        quiet = Progress("pretrain", epochs=2, batches_per_epoch=10, max_steps=0, enabled=False,
                         stream=stream, clock=Clock())
        train(quiet, quiet.clock, epoch=0, batches=10, first_step=1)
        assert stream.getvalue() == ""
    assert progress_lines(caplog) == []


@pytest.mark.process
def test_a_training_run_into_a_pipe_logs_plain_lines_and_no_carriage_returns(smoke_shards, tmp_path):
    done = run_bounded(
        [str(BIN / "pegasus-dist"), "train", "--config", str(REPO / "configs/smoke/pretrain.yaml"),
         f"data.shards={smoke_shards}", f"run.output_dir={tmp_path}", "train.epochs=2",
         "data.batch_size=32", "train.log_every=5", "wandb.mode=offline", *TINY_ARGS],
        timeout=180, env={"WANDB_API_KEY": "", "WANDB_SILENT": "false"},
    )
    assert done.returncode == 0, done.stdout[-4000:]
    out = done.stdout
    assert "\r" not in out
    # 470 training images in batches of 32: 15 batches an epoch
    for epoch, step in ((1, 15), (2, 30)):
        assert re.search(rf"^\d\d:\d\d:\d\d \[rank 0\] pegasus_dist\.training\.progress: "
                         rf"pretrain: epoch {epoch}/2, batch 15/15, step {step}/30, [\d,]+ images/s, "
                         r"ETA \d+:\d\d:\d\d$", out, re.M)
    # every log line starts a line of its own
    for line in out.splitlines():
        if "[rank 0]" in line:
            assert re.match(r"\d\d:\d\d:\d\d \[rank 0\] ", line), line
    assert "batch/s" not in out and "%|" not in out  # nothing of a tqdm bar
