"""Two machines that see the run differently: a shared filesystem whose view is stale, or a config
that differs.

Issue 22 item 1. On NFS a rank on another node can see, for a while, a folder
that is gone or miss one just written. Every decision that steers the ranks
(which checkpoint to resume, whether a save happens, whether the run is done)
is the main process's, shared with the others, so no view can split them
between a barrier and none. Here rank 1 runs as machine 1 in a mount namespace
of its own (``unshare -m``), where the run's checkpoint folder is a stale copy.
A node started with other overrides (or its own copy of the YAML) is refused
before any rank trains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SMOKE, Trained
from processes import REPO, free_port, machine_env, popen

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.prepare import prepare
from pegasus_dist.model.saved import list_checkpoints
from pegasus_dist.training.state import read_state

pytestmark = pytest.mark.process
BOUND_S = 150  # the collectives time out after 30 s: a run that takes longer hung


def two_machines(run: Trained, steps: int, stale: Path | None = None, real: Path | None = None,
                 rank1: tuple[str, ...] = ()) -> list[str]:
    """Machine 0 sees the real folders; machine 1 sees ``stale`` in place of ``real`` (the run's
    checkpoints unless given), if given, and adds the overrides ``rank1``. Their outputs."""
    probe = ["unshare", "-m", "true"]
    if stale and (os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(probe).returncode):
        pytest.skip("a mount namespace per rank needs root, unshare and CAP_SYS_ADMIN (CI has them)")
    real, port = real or run.pretrain / "checkpoints", free_port()
    procs = []
    for rank in (0, 1):
        env = os.environ | machine_env(rank, 2, port)  # no launcher: less to import
        cmd = [sys.executable, str(REPO / "pegasus_dist/train.py"), "--config", SMOKE, *run.overrides,
               f"train.max_steps={steps}", "train.collective_timeout_s=30", *(rank1 if rank else ())]
        if rank == 1 and stale:
            cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
                   str(stale), str(real), *cmd]
        procs.append(popen(cmd, env=env))
    try:
        outputs = [proc.communicate(timeout=BOUND_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    assert all(proc.returncode is not None for proc in procs)
    return [f"exit {proc.returncode}\n{out}" for proc, out in zip(procs, outputs, strict=True)]


def test_a_rank_that_sees_the_final_step_already_saved_follows_the_main_process(checkpointed_run,
                                                                                 tmp_path):
    """Rank 1's stale view holds a step_9 (of a run since deleted): it must not skip the save's barrier."""
    stale = tmp_path / "stale"
    shutil.copytree(checkpointed_run.pretrain / "checkpoints", stale)
    shutil.copytree(stale / "step_00000006", stale / "step_00000009")
    main, other = two_machines(checkpointed_run, steps=9, stale=stale)
    assert main.startswith("exit 0") and other.startswith("exit 0"), main[-3000:] + other[-3000:]
    folders = list_checkpoints(checkpointed_run.pretrain / "checkpoints")
    assert [f.name for f in folders] == ["step_00000003", "step_00000006", "step_00000009"]
    assert read_state(folders[-1]).step == 9  # written by this run, not rank 1's stale one
    assert f"resumed from {folders[1]}" in main


def test_a_rank_that_misses_the_newest_checkpoint_ends_the_run_with_one_line(checkpointed_run, tmp_path):
    """Rank 1 does not see step_6 yet: it cannot load the main process's choice; all end, none hangs."""
    stale = tmp_path / "stale"
    shutil.copytree(checkpointed_run.pretrain / "checkpoints", stale)
    shutil.rmtree(stale / "step_00000006")
    main, other = two_machines(checkpointed_run, steps=9, stale=stale)
    assert not main.startswith("exit 0") and not other.startswith("exit 0"), main[-3000:] + other[-3000:]
    errors = [line for line in (main + other).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, main[-3000:] + other[-3000:]
    assert errors[0].startswith("error: rank 1: ") and errors[0].endswith(
        "step_00000006, chosen by the main process, is not there on this node: run.output_dir ("
        f"{checkpointed_run.root}) must be one folder that every node mounts; a shared filesystem that "
        "lags (NFS) shows it seconds later: run the same command again"), errors[0]


def test_a_node_started_with_another_config_is_refused_before_any_rank_trains(checkpointed_run):
    before = list_checkpoints(checkpointed_run.pretrain / "checkpoints")
    main, other = two_machines(checkpointed_run, steps=9, rank1=("optim.lr=0.002", "loss.beta=2"))
    assert main.startswith("exit 2") and other.startswith("exit 2"), main[-3000:] + other[-3000:]
    errors = [line for line in (main + other).splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1: this rank's config differs from rank 0's: loss.beta=2.0 (rank 0: 1.0); "
                      "optim.lr=0.002 (rank 0: 0.001); launch every rank with the same config file and "
                      "overrides (on a cluster: the same checkout of the repository on every node)"], errors
    assert list_checkpoints(checkpointed_run.pretrain / "checkpoints") == before  # nothing trained


def test_a_node_with_its_own_other_copy_of_the_shards_is_refused_before_any_rank_trains(checkpointed_run,
                                                                                       tmp_path):
    """Shards copied to each node's local disk, one copy made by another `prepare`: the same path, other
    images. (A resumed run finds it too: the checkpoint names the shards it trained on.)"""
    overrides = checkpointed_run.overrides
    shards = Path(next(o.partition("=")[2] for o in overrides if o.startswith("data.shards=")))
    prepare(PrepareConfig(out=str(tmp_path / "other"), sources=["synthetic:400"], shard_size=50), "tests")
    fresh = Trained(tmp_path / "fresh", [*overrides, f"run.output_dir={tmp_path / 'fresh'}"], "")
    main, other = two_machines(fresh, steps=9, stale=tmp_path / "other", real=shards)
    assert main.startswith("exit 2") and other.startswith("exit 2"), main[-3000:] + other[-3000:]
    errors = [line for line in (main + other).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: rank 1: this rank's shard set {shards / 'mix'} differs from "
                                "rank 0's: generation="), errors
    assert "samples=392 (rank 0: 470); shard files=8 (rank 0: 10)" in errors[0] and errors[0].endswith(
        "every node must read the same shards: one folder that all mount, or copies of one `prepare` run")
    assert not (fresh.pretrain / "checkpoints").exists()  # nothing trained
