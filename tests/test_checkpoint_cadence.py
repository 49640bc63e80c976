"""When checkpoints are written: by steps, by the main process's clock, at the end; never twice.

Issue 22 item 5: a checkpoint every epoch made about 300 checkpoints (each
with a barrier and pruning) of a finetune on 8 GPUs, whose epochs are 15 steps.
"""

from __future__ import annotations

import pytest
from helpers import TINY_ARGS, Trained
from processes import REPO, run_ranks

from pegasus_dist.config import load_config
from pegasus_dist.model.saved import list_checkpoints
from pegasus_dist.training.loop import train
from pegasus_dist.training.state import read_state

FINETUNE = str(REPO / "configs/smoke/finetune.yaml")
STEPS = 40
MINUTES = 0.02  # 1.2 s between timed checkpoints


def finetune_on_four_ranks(pretrain: Trained, smoke_shards, runs, *extra: str) -> str:
    """A finetune of the tiny model on 4 gloo processes; horse_bird is 211 images, 4 steps an epoch."""
    argv = [str(REPO / "pegasus_dist/train.py"), "--config", FINETUNE, f"data.shards={smoke_shards}",
            f"run.output_dir={runs}", f"train.init_from={pretrain.pretrain}", f"train.max_steps={STEPS}",
            "data.batch_size=16", "train.log_every=1", "train.keep_checkpoints=100", "wandb.mode=disabled",
            *TINY_ARGS, *extra]
    # Every micro-batch 40 ms slower: 40 steps take at least 1.6 s, however fast the machine.
    done = run_ranks(argv, 4, timeout=240, env={"PEGASUS_FAULT": "slow:ms=40"})
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.mark.process
def test_four_ranks_checkpoint_by_the_main_process_clock_and_save_the_end_once(
        checkpointed_run, smoke_shards, tmp_path):
    out = finetune_on_four_ranks(checkpointed_run, smoke_shards, tmp_path,
                                 f"train.checkpoint_minutes={MINUTES}")
    assert "world_size=4" in out, out[-3000:]
    folders = list_checkpoints(tmp_path / "finetune" / "checkpoints")
    steps = [int(folder.name.removeprefix("step_")) for folder in folders]
    assert steps[-1] == STEPS and len(steps) >= 2, steps  # at least one timed checkpoint before the end
    written = [(folder / "SHA256SUMS").stat().st_mtime for folder in folders]
    # A timed checkpoint comes train.checkpoint_minutes after the one before it; the last is the end's.
    gaps = [later - earlier for earlier, later in zip(written[:-1], written[1:-1], strict=False)]
    assert all(gap >= 60 * MINUTES for gap in gaps), gaps
    assert out.count("finetune done at step 40") == 1, out[-3000:]


@pytest.mark.slow
def test_by_default_no_checkpoint_at_epoch_ends_only_the_end(checkpointed_run, smoke_shards, tmp_path):
    """The defaults (every 10 minutes, none by steps): 12 steps in 3 epochs of 4 write one checkpoint."""
    train(load_config(FINETUNE, [f"data.shards={smoke_shards}", f"run.output_dir={tmp_path}",
                                 f"train.init_from={checkpointed_run.pretrain}", "train.max_steps=12",
                                 "data.batch_size=64", "wandb.mode=disabled", *TINY_ARGS]))
    assert read_state(tmp_path / "finetune" / "checkpoints" / "step_00000012").epoch == 3
    assert [f.name for f in list_checkpoints(tmp_path / "finetune" / "checkpoints")] == ["step_00000012"]
