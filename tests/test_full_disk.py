"""A disk that fills up in the middle of training (issue 21), on a real full filesystem, and a run
folder removed under its run.

The run folder is a 20 MB tmpfs in a mount namespace of the test's own (``unshare -m``);
``PEGASUS_FAULT=fill-disk`` fills it before a step, as another job on the node would. The run
must stop in one line that names the file and the space left, with nothing from W&B, whose
offline run writes into the same full disk, and the same command must resume once space is free.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from helpers import BIN, SMOKE, TINY_ARGS, error_lines, overrides
from processes import run_bounded

from pegasus_dist.config import load_config
from pegasus_dist.training.faults import TrainingError
from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.loop import train

pytestmark = pytest.mark.process

# Both runs inside one namespace: its tmpfs goes when the last process in it ends.
SCRIPT = """
mount -t tmpfs -o size=20m tmpfs "$1" || exit 99
shift
PEGASUS_FAULT=fill-disk:step=10 "$@"; echo "first run: exit $?"
rm "$RUNS/pretrain/filler"
"$@"; echo "second run: exit $?"
"""


def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes(smoke_shards, tmp_path):
    probe = ["unshare", "-m", "true"]
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(probe).returncode:
        pytest.skip("a filesystem of the test's own needs root, unshare and CAP_SYS_ADMIN (CI has them)")
    runs = tmp_path / "disk"
    runs.mkdir()
    train = [str(BIN / "pegasus-dist"), "train", "--config", str(SMOKE),
             f"data.shards={smoke_shards}", f"run.output_dir={runs}", *TINY_ARGS, "train.max_steps=30",
             "train.checkpoint_every=5", "train.log_every=2", "wandb.mode=offline"]
    done = run_bounded(["unshare", "-m", "sh", "-c", SCRIPT, "sh", str(runs), *train], timeout=240,
                       env={"RUNS": str(runs)})
    first, _, second = done.stdout.partition("first run: exit ")
    assert second.startswith("2\n"), first[-4000:]
    (line,) = error_lines(first)  # the checkpoint of step 10 is the first write that needs a block
    step_10 = runs / "pretrain/checkpoints/step_00000010"
    assert line.startswith(f"error: cannot write checkpoint {step_10}: "), line
    assert "No space left on device" in line
    assert re.search(r"\(0 MB free there, a checkpoint takes \d+\.\d MB\); "
                     f"{runs}/pretrain/checkpoints/step_00000005 is intact: free space", line), line
    assert "Traceback" not in first and "Logging error" not in first
    assert second.rstrip().endswith("second run: exit 0"), second[-4000:]
    assert f"resumed from {runs}/pretrain/checkpoints/step_00000005" in second
    assert "pretrain done at step 30" in second


def test_a_run_folder_removed_under_the_run_is_one_line(smoke_shards, tmp_path):
    """`rm -rf` of the run folder after step 2: the next write into it (step 3's metrics row) ends
    the run in one line naming the file, not in a traceback of the error and of its report."""
    def remove(trainer, _batch) -> None:
        if trainer.state.step == 2 and trainer.cfg.run_dir.exists():
            shutil.rmtree(trainer.cfg.run_dir)
    cfg = load_config(SMOKE, overrides(smoke_shards, tmp_path, 6, *TINY_ARGS))
    with pytest.raises(TrainingError) as stopped:
        train(cfg, Hooks(before_micro_batch=[remove]))
    assert str(stopped.value).startswith(f"cannot write {cfg.run_dir}: No such file or directory; "), \
        stopped.value
    assert str(stopped.value).endswith("run the same command to resume from the last checkpoint it holds")
