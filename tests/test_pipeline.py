"""End to end, as a user runs it: prepare, pretrain, finetune, sample (one CPU process)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter

import numpy as np
import pytest
from helpers import (
    PIPELINE_STEPS,
    SMOKE,
    TINY_ARGS,
    assert_pegasus_layout,
    assert_tiles_show_images,
    cli_here,
    grid_tiles,
    labels_of,
    overrides,
    rows_apart,
    run_cli,
)
from PIL import Image
from processes import BIN, REPO, run_bounded

from bench.fixtures import REAL_CIFAR
from pegasus_dist.data.manifest import load_manifest


def test_the_pipeline_trains_both_phases_and_its_grid_blends_real_horses_into_birds(smoke_pipeline,
                                                                                   smoke_shards):
    out, pretrain, finetune = smoke_pipeline.output, smoke_pipeline.pretrain, smoke_pipeline.finetune
    final = f"step_{PIPELINE_STEPS:08d}"
    assert f"reusing the shards at {smoke_shards}" in out and "world_size=1" in out
    assert f"initialised finetune from {pretrain}/checkpoints/{final}" in out
    saved = (finetune / "config.yaml").read_text()
    assert "phase: finetune" in saved and "shard_set: horse_bird" in saved
    labels = labels_of(smoke_shards / "horse_bird")
    for run in (pretrain, finetune):
        assert (run / "checkpoints" / final / "model.safetensors").is_file()
        logged = [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if f"{run.name}/loss" in row]
        assert logged == list(range(5, PIPELINE_STEPS + 1, 5))
        layout = assert_pegasus_layout(run / "samples", labels)
        for name in ("pegasus", "reconstructions", "prior"):
            png = run / "samples" / f"{name}.png"
            assert_tiles_show_images(grid_tiles(png, layout["tile_size"], layout["padding"]), png)
    # The finetuned model's grid, `make demo`'s: its rows turn from their horse to something else,
    # and none stands still. Per row, how far they get varies with the CPU's rounding (on one
    # machine a row went 3.4 grey levels where the others went 4-20), so most rows must move
    # clearly and every row visibly; a frozen row (one decode drawn 8 times) is 0.
    tiles = grid_tiles(finetune / "samples/pegasus.png", 32, 2).astype(float)
    ends = np.abs(tiles[:, 0] - tiles[:, -1]).mean(axis=(1, 2, 3))
    assert np.median(ends) > 5 and (ends > 2).all(), f"mu = 0.4 and 0.7 tiles alike: {ends.round(1)}"
    # ... and each row shows its own pair, not one picture drawn eight times.
    assert np.median(rows_apart(tiles)) > 5, f"the rows look alike: {np.median(rows_apart(tiles)):.1f}"


def test_the_sample_command_redraws_the_grid_of_the_run(smoke_pipeline, tmp_path, capsys):
    """`pegasus-dist sample` from the run folder (its newest checkpoint): same model, same seeds."""
    finetune = smoke_pipeline.finetune
    code, out = cli_here(capsys, "sample", "--checkpoint", str(finetune), "--out", str(tmp_path))
    assert code == 0, out
    for name in ("pegasus.png", "reconstructions.png", "prior.png", "pegasus.json"):
        assert (tmp_path / name).read_bytes() == (finetune / "samples" / name).read_bytes(), name


@pytest.mark.process
def test_accelerate_launch_runs_the_script_with_wandb_offline(smoke_shards, tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch/cpu-1proc.yaml"),
           str(REPO / "pegasus_dist/train.py"), "--config", SMOKE,
           *overrides(smoke_shards, tmp_path, 2), "wandb.mode=offline", *TINY_ARGS]
    done = run_bounded(cmd, timeout=300, env={"WANDB_API_KEY": "", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stdout[-6000:]
    offline = list((tmp_path / "pretrain" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    record = offline[0].read_bytes()
    assert b"pretrain/loss" in record and b"pretrain/images_per_s" in record  # per-step rows
    assert b"sampler" in record and b"horse_bird" in record  # the resolved config
    logged = {p.name.split("_")[0]: p for p in offline[0].parent.glob("files/media/images/pretrain/*")}
    assert logged.keys() == {"pegasus", "reconstructions", "prior"}  # the grids, after the phase
    for name, path in logged.items():  # showing exactly the pixels of the PNGs in samples/
        with Image.open(path) as shown, Image.open(tmp_path / f"pretrain/samples/{name}.png") as png:
            assert np.array_equal(np.asarray(shown), np.asarray(png)), name


@pytest.mark.process
def test_bf16_mixed_precision_trains_on_the_cpu_through_pegasus_dist_train(smoke_shards, tmp_path):
    out = run_cli("train", "--config", SMOKE, *overrides(smoke_shards, tmp_path, 3),
                  "train.mixed_precision=bf16", *TINY_ARGS)
    assert "mixed_precision=bf16" in out
    rows = [json.loads(line) for line in (tmp_path / "pretrain/metrics.jsonl").read_text().splitlines()]
    losses = [row["pretrain/loss"] for row in rows if "pretrain/loss" in row]
    # a 32x32 image's BCE summed over its 3,072 values starts near 3,072 ln 2 = 2,129 nats
    assert len(losses) == 3 and all(1000 < loss < 2500 for loss in losses), losses


@pytest.mark.process
@pytest.mark.skipif(not REAL_CIFAR.is_file(), reason=f"real CIFAR-10 JPEGs not at {REAL_CIFAR}")
def test_real_cifar10_jpegs_prepare_train_and_sample(tmp_path, capsys):
    shards = tmp_path / "shards"
    code, out = cli_here(capsys, "prepare", "--source", f"folder:{REAL_CIFAR}", "--out", str(shards),
                         "--shard-size", "10000")
    assert code == 0, out[-3000:]
    # The image-folder source read all of CIFAR-10: 6,000 of each class (automobile as car),
    # 50,000 training and 10,000 test images, held out or trained on, never both.
    assert hashlib.sha256(REAL_CIFAR.read_bytes()).hexdigest().startswith("b4d6b534")
    mix, held_out = (load_manifest(shards / name).counts for name in ("mix", "eval"))
    assert Counter(mix["label"]) + Counter(held_out["label"]) == dict.fromkeys(
        ["airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "ship", "truck"], 6000)
    assert Counter(mix["split"]) + Counter(held_out["split"]) == {"train": 50000, "test": 10000}
    counts = load_manifest(shards / "horse_bird").counts["label"]
    assert counts == {"bird": mix["label"]["bird"], "horse": mix["label"]["horse"]}
    # `python pegasus_dist/train.py` as a plain script, then the finetune phase and the sampler
    runs = tmp_path / "runs"
    done = run_bounded([sys.executable, str(REPO / "pegasus_dist/train.py"), "--config", SMOKE,
                        *overrides(shards, runs, 3), *TINY_ARGS], timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    code, out = cli_here(capsys, "train", "--config", str(REPO / "configs/smoke/finetune.yaml"),
                         *overrides(shards, runs, 3), *TINY_ARGS, f"train.init_from={runs / 'pretrain'}")
    assert code == 0, out[-3000:]
    layout = assert_pegasus_layout(runs / "finetune" / "samples", labels_of(shards / "horse_bird"))
    assert all(row["horse"].startswith("folder_cifar10_jpg-") for row in layout["rows"])


@pytest.mark.parametrize(("source", "message"), [
    ("cifar10:{tmp}/missing.tar.gz", "cifar10 archive not found"),
    ("imagenet:x", "unknown source 'imagenet:x'"),
])
def test_prepare_errors_are_one_line_with_exit_code_2(tmp_path, capsys, source, message):
    code, out = cli_here(capsys, "prepare", "--source", source.format(tmp=tmp_path),
                         "--out", str(tmp_path / "out"))
    assert code == 2
    assert out.strip().splitlines() == [out.strip().splitlines()[-1]]  # nothing but the error
    assert out.strip().startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()
