"""What reaches W&B, read back from real offline runs: the grids' pixels, captions, names, history.

The runs are read as a user would, with W&B's own reader: ``wandb leet inspect --json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import PIPELINE_STEPS, TINY, TINY_ARGS, losses, metrics, training_steps
from PIL import Image
from processes import BIN, REPO, popen, run_bounded

pytestmark = pytest.mark.process  # real pegasus-dist runs, logging to W&B offline
OFFLINE = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}


def train_args(phase: str, shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    """A smoke run of the tiny model logging to W&B offline."""
    return ["--config", str(REPO / f"configs/smoke/{phase}.yaml"), f"data.shards={shards}",
            f"run.output_dir={runs}", f"train.max_steps={steps}", "data.batch_size=16",
            "wandb.mode=offline", *TINY_ARGS, *extra]


def train(*args: str) -> str:
    done = run_bounded([str(BIN / "pegasus-dist"), "train", *args], timeout=300, env=OFFLINE)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def offline_files(run: Path) -> list[Path]:
    """The run-<id>.wandb files of a run folder, oldest first (folder names start with the time)."""
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


def records(wandb_file: Path) -> dict[str, list[dict]]:
    """The records in ``wandb_file`` by kind (run, config, history, summary ...), each in order."""
    done = run_bounded([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_file)], timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]
    by_kind: dict[str, list[dict]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):  # not a warning wandb may print
            record = json.loads(line)
            by_kind.setdefault(record["type"], []).append(record[record["type"]])
    return by_kind


def history(logged: dict[str, list[dict]]) -> dict[int, dict]:
    """The history rows of a run's records by step; a step logged twice fails."""
    rows = [r["item"] for r in logged.get("history", [])]
    steps = [row["_step"] for row in rows]
    assert len(steps) == len(set(steps)), steps
    return {row["_step"]: row for row in rows}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_both_phases_reach_wandb_in_one_group_with_the_grids_pixels_and_captions(smoke_shards,
                                                                                  tmp_path):
    runs = tmp_path / "smoke"
    fast = ("optim.lr=0.01", "optim.lr_scaling=none", "optim.warmup_steps=0")  # grids that show images
    train(*train_args("pretrain", smoke_shards, runs, PIPELINE_STEPS, "train.log_every=10", *fast))
    train(*train_args("finetune", smoke_shards, runs, 2, f"train.init_from={runs}/pretrain", *fast))
    run_ids = {}
    for phase, step in (("pretrain", PIPELINE_STEPS), ("finetune", 2)):
        (wandb_file,) = offline_files(runs / phase)
        written = records(wandb_file)
        (run,) = written["run"]
        assert (run["display_name"], run["run_group"], run["job_type"]) == (f"smoke/{phase}", "smoke", phase)
        run_ids[phase] = run["run_id"]
        rows = history(written)
        final = rows[step]
        samples = runs / phase / "samples"
        for name in ("pegasus", "reconstructions", "prior"):
            logged = pixels(wandb_file.parent / "files" / final[f"{phase}/{name}.path"])
            assert np.array_equal(logged, pixels(samples / f"{name}.png")), name
            assert len(np.unique(logged.reshape(-1, 3), axis=0)) > 16, name  # not blank
        layout = json.loads((samples / "pegasus.json").read_text())
        caption = final[f"{phase}/pegasus.caption"]
        assert "columns mu = " + ", ".join(f"{mu:.2f}" for mu in layout["rows"][0]["mu"]) in caption
        for row in layout["rows"]:
            assert f"row {row['row'] + 1}: horse {row['horse']}, bird {row['bird']}" in caption
        assert final[f"{phase}/reconstructions.caption"].startswith("row 1: 8 horses, row 2: their")
        assert final[f"{phase}/prior.caption"].startswith("64 samples of the prior")
        # Constants are in the config and summary, not in every history row.
        logged_keys = {k for row in rows.values() for k in row}
        assert not [k for k in logged_keys if k.endswith(("global_batch", "latent_dim", "images"))]
        config = {**run["config"]["update"]}
        for update in written.get("config", []):
            config.update(update["update"])
        launch = config["launch"]
        assert (launch["world_size"], launch["global_batch"]) == (1, 16) and launch["lr"] > 0
        summary = {k: v for update in written["summary"] for k, v in update["update"].items()}
        assert summary[f"{phase}/eval/all/latent_dim"] == TINY.latent_dim
    started = config["started_from"]  # the finetune run's config: the pretrain run it started from
    assert started["wandb_run_id"] == run_ids["pretrain"]
    assert started["checkpoint"] == str((runs / f"pretrain/checkpoints/step_{PIPELINE_STEPS:08d}").resolve())


def assert_the_newest_folder_holds_the_whole_history(run: Path) -> list[dict[int, dict]]:
    """metrics.jsonl: one training row per step. W&B: the newest folder holds every one of them,
    the older ones a part; every row W&B holds has metrics.jsonl's values (the resume is exact)."""
    steps = training_steps(run)
    assert steps == sorted(set(steps)), steps  # one row per logged step
    rows = {row["step"]: row for row in metrics(run)}
    folders = [history(records(path)) for path in offline_files(run)]
    assert sorted(folders[-1]) == sorted(rows), (sorted(folders[-1]), sorted(rows))
    for folder in folders:
        for step, logged in folder.items():
            expected = {k: v for k, v in rows[step].items() if k != "step"}
            assert {k: logged[k] for k in expected} == expected, step
    return folders


def test_a_run_killed_and_resumed_leaves_no_hole_in_the_wandb_history(smoke_shards, tmp_path):
    args = train_args("pretrain", smoke_shards, tmp_path, 24, "train.log_every=1",
                      "train.checkpoint_every=8")
    run = tmp_path / "pretrain"
    # Slowed down (100 ms a step, same numbers) so that the kill lands mid-run, after step 13.
    proc = popen([sys.executable, str(REPO / "pegasus_dist/train.py"), *args],
                 env={**OFFLINE, "PEGASUS_FAULT": "slow:ms=100"})
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(training_steps(run)) >= 13):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the run did not reach step 13 in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = train(*args)
    assert "resumed from" in out and "this launch writes a folder of its own" in out
    folders = assert_the_newest_folder_holds_the_whole_history(run)
    assert len(folders) == 2 and sorted(folders[-1]) == list(range(1, 25))


def test_a_wandb_service_killed_mid_run_costs_only_wandb(smoke_shards, tmp_path):
    """W&B's service process killed before step 5 (an OOM killer, a crash of wandb-core): one
    warning, and the phase trains to its end with the numbers and the grid of a run without W&B."""
    def run(name: str, mode: str, fault: str = "") -> tuple[Path, str]:
        cmd = [str(BIN / "pegasus-dist"), "train", *train_args("pretrain", smoke_shards, tmp_path / name, 12,
                                                                "train.log_every=1", f"wandb.mode={mode}")]
        done = run_bounded(cmd, timeout=300, env={**OFFLINE, "PEGASUS_FAULT": fault})
        assert done.returncode == 0, done.stdout[-4000:]
        return tmp_path / name / "pretrain", done.stdout

    killed, out = run("killed", "offline", "kill-wandb:step=5")
    warnings = [line for line in out.splitlines() if "W&B stopped at step " in line]
    assert len(warnings) == 1 and "training goes on without it; metrics.jsonl in " in warnings[0], out[-4000:]
    assert "Traceback" not in out
    without, _ = run("without", "disabled")
    assert training_steps(killed) == list(range(1, 13)) and metrics(killed)[-1]["step"] == 12  # + evaluation
    assert losses(killed) == losses(without)
    assert np.array_equal(pixels(killed / "samples/pegasus.png"), pixels(without / "samples/pegasus.png"))
