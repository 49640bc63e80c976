"""What reaches W&B, read back from real offline runs: the grids' pixels, captions, names, history."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import FAULT, training_steps
from PIL import Image
from processes import BIN, REPO, run_bounded

from pegasus_dist.training.wandb_records import history_steps, read_records

pytestmark = pytest.mark.slow
OFFLINE = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}


def train_args(phase: str, shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(REPO / f"configs/smoke/{phase}.yaml"), f"data.shards={shards}",
            f"run.output_dir={runs}", f"train.max_steps={steps}", "data.batch_size=16",
            "wandb.mode=offline", *extra]


def train(*args: str) -> str:
    done = run_bounded([str(BIN / "pegasus-dist"), "train", *args], timeout=300, env=OFFLINE)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def offline_files(run: Path) -> list[Path]:
    """The run-<id>.wandb files of a run folder, oldest first (folder names start with the time)."""
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


def items(updates) -> dict[str, object]:
    """Config, summary or history items by their flat key, with their values decoded."""
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_both_phases_reach_wandb_in_one_group_with_the_grids_pixels_and_captions(smoke_shards,
                                                                                  tmp_path):
    runs = tmp_path / "smoke"
    train(*train_args("pretrain", smoke_shards, runs, 20, "train.log_every=5"))
    train(*train_args("finetune", smoke_shards, runs, 2, f"train.init_from={runs}/pretrain"))
    run_ids = {}
    for phase, step in (("pretrain", 20), ("finetune", 2)):
        (wandb_file,) = offline_files(runs / phase)
        records = list(read_records(wandb_file))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.display_name, run.run_group, run.job_type) == (f"smoke/{phase}", "smoke", phase)
        run_ids[phase] = run.run_id
        history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
        (final,) = [items(h.item) for h in history if h.step.num == step]
        samples = runs / phase / "samples"
        for name in ("pegasus", "reconstructions", "prior"):
            logged = pixels(wandb_file.parent / "files" / final[f"{phase}/{name}/path"])
            assert np.array_equal(logged, pixels(samples / f"{name}.png")), name
            assert len(np.unique(logged.reshape(-1, 3), axis=0)) > 16, name  # not blank
        layout = json.loads((samples / "pegasus.json").read_text())
        caption = final[f"{phase}/pegasus/caption"]
        assert "columns mu = " + ", ".join(f"{mu:.2f}" for mu in layout["rows"][0]["mu"]) in caption
        for row in layout["rows"]:
            assert f"row {row['row'] + 1}: horse {row['horse']}, bird {row['bird']}" in caption
        assert final[f"{phase}/reconstructions/caption"].startswith("row 1: 8 horses, row 2: their")
        assert final[f"{phase}/prior/caption"].startswith("64 samples of the prior")
        # Constants are in the config and summary, not in every history row.
        logged_keys = {k for h in history for k in items(h.item)}
        assert not [k for k in logged_keys if k.endswith(("global_batch", "latent_dim", "images"))]
        config = {k: v for r in records if r.WhichOneof("record_type") == "config"
                  for k, v in items(r.config.update).items()}
        launch = config["launch"]
        assert (launch["world_size"], launch["global_batch"]) == (1, 16) and launch["lr"] > 0
        summary = {k: v for r in records if r.WhichOneof("record_type") == "summary"
                   for k, v in items(r.summary.update).items()}
        assert summary[f"{phase}/eval/all/latent_dim"] == 32
    started = config["started_from"]  # the finetune run's config: the pretrain run it started from
    assert started["wandb_run_id"] == run_ids["pretrain"]
    assert started["checkpoint"] == str((runs / "pretrain/checkpoints/step_00000020").resolve())


def assert_one_history_without_holes(run: Path) -> list[list[int]]:
    """metrics.jsonl: one training row per step; W&B: the same steps, each folder increasing."""
    steps = training_steps(run)
    assert steps == sorted(set(steps)), steps  # one row per logged step
    folders = [history_steps(path) for path in offline_files(run)]
    for earlier, later in zip(folders, folders[1:], strict=False):
        if earlier and later:
            assert earlier[-1] < later[0], folders  # disjoint, in the order wandb sync replays
    for folder in folders:
        assert folder == sorted(set(folder)), folders  # each folder increasing
    assert sorted(s for folder in folders for s in folder) == steps, (folders, steps)  # no hole
    return folders


def test_a_run_killed_and_resumed_leaves_no_hole_in_the_wandb_history(smoke_shards, tmp_path):
    args = train_args("pretrain", smoke_shards, tmp_path, 24, "train.log_every=1",
                      "train.checkpoint_every=8")
    run = tmp_path / "pretrain"
    # Slowed down (100 ms a step, same numbers) so that the kill lands mid-run, after step 13.
    proc = subprocess.Popen([sys.executable, str(FAULT), "slow", "100", "0", *args], cwd=REPO,
                            env={**os.environ, **OFFLINE}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(training_steps(run)) >= 13):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the run did not reach step 13 in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = train(*args)
    assert "resumed from" in out and "holds steps up to" in out
    folders = assert_one_history_without_holes(run)
    assert len(folders) == 2 and folders[-1][-1] == 24


@pytest.mark.parametrize("earlier_file", ["intact", "corrupt"])
def test_steps_wandb_holds_are_not_sent_again_and_an_unreadable_file_is_named(
        smoke_shards, tmp_path, earlier_file):
    args = train_args("pretrain", smoke_shards, tmp_path, 6, "train.log_every=1",
                      "train.checkpoint_every=4")
    train(*args)
    run = tmp_path / "pretrain"
    # As if killed after W&B wrote step 6 but before the final checkpoint: resume from step 4.
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (wandb_file,) = offline_files(run)
    if earlier_file == "corrupt":
        data = bytearray(wandb_file.read_bytes())
        data[data.rindex(b"pretrain/loss")] ^= 0xFF  # a history record fails its checksum
        wandb_file.write_bytes(bytes(data))
    out = train(*args)
    if earlier_file == "intact":
        assert assert_one_history_without_holes(run) == [[1, 2, 3, 4, 5, 6], []]
    else:
        warnings = [line for line in out.splitlines() if "is corrupt at byte" in line]
        assert len(warnings) == 1 and str(wandb_file) in warnings[0], out[-3000:]
        assert "logging every row of metrics.jsonl to W&B again" in warnings[0]
        assert training_steps(run) == [1, 2, 3, 4, 5, 6]
        assert history_steps(offline_files(run)[1]) == [1, 2, 3, 4, 5, 6]  # all again
