"""End to end, as a user runs it: prepare, pretrain, finetune, sample (one CPU process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image
from processes import BIN, REPO, run_bounded

from pegasus_dist.data.folders import REAL_CIFAR
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.shards import ShardSet

pytestmark = pytest.mark.slow


def smoke_overrides(shards: Path, runs: Path, steps: int = 4) -> list[str]:
    return [f"data.shards={shards}", f"run.output_dir={runs}", f"train.max_steps={steps}",
            "wandb.mode=disabled", "data.batch_size=16"]


def assert_pegasus_grid(samples: Path, shards: Path) -> None:
    layout = json.loads((samples / "pegasus.json").read_text())
    tile, pad = layout["tile_size"], layout["padding"]
    assert (tile, layout["columns"], len(layout["rows"])) == (32, 8, 8)
    with Image.open(samples / "pegasus.png") as grid:
        assert grid.size == (8 * (tile + pad) + pad, 8 * (tile + pad) + pad)
    labels = {s.key: s.meta["label"] for s in ShardSet(shards / "horse_bird")}
    for row in layout["rows"]:
        assert labels[row["horse"]] == "horse" and labels[row["bird"]] == "bird"
        assert row["mu"][0] == pytest.approx(0.4) and row["mu"][-1] == pytest.approx(0.7)
    for name in ("reconstructions.png", "prior.png"):
        with Image.open(samples / name) as image:
            assert image.size[0] == 8 * (tile + pad) + pad


def test_two_phases_then_the_sampler(smoke_shards, tmp_path):
    runs = tmp_path / "runs"
    out = run_cli("train", "--config", str(REPO / "configs/smoke/pretrain.yaml"),
                  *smoke_overrides(smoke_shards, runs))
    pretrain = runs / "pretrain"
    assert "world_size=1" in out
    assert (pretrain / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    assert len((pretrain / "metrics.jsonl").read_text().splitlines()) >= 1
    assert_pegasus_grid(pretrain / "samples", smoke_shards)

    out = run_cli("train", "--config", str(REPO / "configs/smoke/finetune.yaml"),
                  *smoke_overrides(smoke_shards, runs), f"train.init_from={pretrain}")
    finetune = runs / "finetune"
    assert f"initialised finetune from {pretrain}/checkpoints/step_00000004" in out
    saved = (finetune / "config.yaml").read_text()
    assert "phase: finetune" in saved and "shard_set: horse_bird" in saved
    assert (finetune / "checkpoints" / "step_00000004").is_dir()
    assert_pegasus_grid(finetune / "samples", smoke_shards)

    # `pegasus-dist sample` from the run folder (its newest checkpoint)
    run_cli("sample", "--checkpoint", str(finetune), "--out", str(tmp_path / "again"))
    assert_pegasus_grid(tmp_path / "again", smoke_shards)
    a = (finetune / "samples" / "pegasus.png").read_bytes()
    assert a == (tmp_path / "again" / "pegasus.png").read_bytes()  # same model, same seeds


def test_accelerate_launch_runs_the_script_with_wandb_offline(smoke_shards, tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch/cpu-1proc.yaml"),
           str(REPO / "pegasus_dist/train.py"), "--config", str(REPO / "configs/smoke/pretrain.yaml"),
           *smoke_overrides(smoke_shards, tmp_path, steps=2), "wandb.mode=offline"]
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.epoch=3"], "unknown config key train.epoch"),
        (["data.shard_set=nope"], "nope"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(smoke_shards, tmp_path, args, message):
    cmd = [str(BIN / "pegasus-dist"), "train", "--config",
           str(REPO / "configs/smoke/pretrain.yaml"), *smoke_overrides(smoke_shards, tmp_path),
           *args]
    done = run_bounded(cmd, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in done.stdout


def test_bf16_mixed_precision_trains_on_the_cpu(smoke_shards, tmp_path):
    out = run_cli("train", "--config", str(REPO / "configs/smoke/pretrain.yaml"),
                  *smoke_overrides(smoke_shards, tmp_path, steps=3), "train.mixed_precision=bf16",
                  "train.log_every=1")
    assert "mixed_precision=bf16" in out
    rows = [json.loads(line) for line in (tmp_path / "pretrain/metrics.jsonl").read_text().splitlines()]
    losses = [row["pretrain/loss"] for row in rows if "pretrain/loss" in row]
    assert len(losses) == 3 and all(0 < loss < 1e5 for loss in losses)




@pytest.mark.skipif(not REAL_CIFAR.is_file(), reason=f"real CIFAR-10 JPEGs not at {REAL_CIFAR}")
def test_real_cifar10_jpegs_prepare_train_and_sample(tmp_path):
    shards = tmp_path / "shards"
    run_cli("prepare", "--source", f"folder:{REAL_CIFAR}", "--out", str(shards),
            "--shard-size", "10000", timeout=600)
    counts = load_manifest(shards / "horse_bird").counts["label"]
    assert counts == {"bird": counts["bird"], "horse": counts["horse"]}
    assert counts["bird"] + counts["horse"] + load_manifest(shards / "eval").counts["label"].get(
        "horse", 0) + load_manifest(shards / "eval").counts["label"].get("bird", 0) == 12000
    # `python pegasus_dist/train.py` as a plain script, then the finetune phase and the sampler
    done = run_bounded([sys.executable, str(REPO / "pegasus_dist/train.py"), "--config",
                        str(REPO / "configs/smoke/pretrain.yaml"),
                        *smoke_overrides(shards, tmp_path / "runs", steps=3)], timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    run_cli("train", "--config", str(REPO / "configs/smoke/finetune.yaml"),
            *smoke_overrides(shards, tmp_path / "runs", steps=3),
            f"train.init_from={tmp_path / 'runs' / 'pretrain'}")
    assert_pegasus_grid(tmp_path / "runs" / "finetune" / "samples", shards)
    rows = json.loads((tmp_path / "runs/finetune/samples/pegasus.json").read_text())["rows"]
    assert all(row["horse"].startswith("folder_cifar10_jpg-") for row in rows)


def test_prepare_errors_are_one_line_with_exit_code_2(tmp_path):
    for source, message in ((f"cifar10:{tmp_path}/missing.tar.gz", "cifar10 archive not found"),
                            ("imagenet:x", "unknown source 'imagenet:x'")):
        done = run_bounded([str(BIN / "pegasus-dist"), "prepare", "--source", source,
                            "--out", str(tmp_path / "out")], timeout=60)
        assert done.returncode == 2
        assert done.stdout.strip().splitlines()[-1].startswith(f"error: {message}")
