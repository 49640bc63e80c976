"""Beyond the paper: held-out eval, contact sheet, lerp and the wing vector, 64/96 px, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from processes import BIN, REPO, run_bounded

from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.evaluation.contact_sheet import contact_sheet, draw_sheet
from pegasus_dist.evaluation.sampler import (
    analogy_grid,
    attribute_vector,
    load_trained_model,
    pegasus_grid,
    pick_horses_and_birds,
)
from pegasus_dist.model.vae import LOG_SCALE_INIT

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 300) -> str:
    done = run_bounded([str(BIN / "pegasus-dist"), *args], timeout)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(smoke_shards, tmp_path_factory):
    """A pretrain and a finetune run of a few steps on the synthetic shards."""
    runs = tmp_path_factory.mktemp("runs")
    common = [f"data.shards={smoke_shards}", f"run.output_dir={runs}", "train.max_steps=6",
              "wandb.mode=disabled", "data.batch_size=16", "train.log_every=2"]
    cli("train", "--config", str(REPO / "configs/smoke/pretrain.yaml"), *common)
    cli("train", "--config", str(REPO / "configs/smoke/finetune.yaml"), *common,
        f"train.init_from={runs}/pretrain")
    return runs


def test_eval_runs_after_each_phase_and_is_consistent(trained, smoke_shards):
    for phase in ("pretrain", "finetune"):
        metrics = json.loads((trained / phase / "eval" / "step_00000006.json").read_text())
        everything = metrics["all"]
        assert everything["images"] == load_manifest(smoke_shards / "eval").num_samples
        for subset in metrics.values():
            if not subset["images"]:
                continue
            assert all(math.isfinite(v) for v in subset.values())
            assert subset["neg_elbo_nats"] == pytest.approx(subset["recon_nats"] + subset["kl_nats"])
            assert subset["bits_per_dim"] == pytest.approx(
                subset["neg_elbo_nats"] / (3 * 32 * 32 * math.log(2)))
            assert 0 <= subset["active_units"] <= subset["latent_dim"] == 32
            assert subset["psnr_db"] > 0
    logged = [json.loads(line) for line in (trained / "finetune/metrics.jsonl").read_text().splitlines()]
    assert any("finetune/eval/all/neg_elbo_nats" in row for row in logged)


def test_eval_command_matches_the_automatic_one(trained, tmp_path):
    cli("eval", "--checkpoint", str(trained / "finetune"), "--out", str(tmp_path / "e.json"))
    again = json.loads((tmp_path / "e.json").read_text())
    assert again == json.loads((trained / "finetune/eval/step_00000006.json").read_text())


def test_contact_sheet_tiles_show_the_keys_they_name(smoke_shards, tmp_path):
    png, listing = contact_sheet(smoke_shards / "horse_bird", tmp_path / "sheet.png",
                                 per_label=10, columns=4, tile=64)
    keys = json.loads(listing.read_text())["keys"]
    assert {label: len(k) for label, k in keys.items()} == {"horse": 10, "bird": 10}
    shard_set = ShardSet(smoke_shards / "horse_bird")
    samples = {s.key: s for s in shard_set}
    images = shard_set.images({key for ks in keys.values() for key in ks})
    expected, captions = draw_sheet(keys, images, columns=4, tile=64)
    with Image.open(png) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.shape == (expected.height, 4 * 64, 3)
    assert [c.key for c in captions] == keys["horse"] + keys["bird"]
    for caption in captions:
        key = caption.key
        assert samples[key].meta["label"] in keys and key in keys[samples[key].meta["label"]]
        x, y = caption.strip[0], caption.strip[1] - 64  # the tile sits on its caption strip
        assert np.array_equal(pixels[y : y + 64 : 2, x : x + 64 : 2], images[key])  # 2x nearest


def test_wing_vector_at_strength_zero_reproduces_the_horses(trained, smoke_shards):
    cfg, model, _ = load_trained_model(trained / "finetune", [])
    model.eval()
    horses, birds = pick_horses_and_birds(cfg.sampler, smoke_shards, 32)
    vector = attribute_vector(model, cfg.sampler, smoke_shards)
    assert vector.shape == (32,) and vector.norm() > 0
    images, rows = analogy_grid(model, horses, vector, cfg.sampler)
    with torch.no_grad():
        mu, _ = model.encode(horses.images.float() / 255)
        reconstructions = model.decode(mu)
    assert torch.allclose(images.view(8, 8, 3, 32, 32)[:, 0], reconstructions, atol=1e-6)
    assert rows[0]["strength"][0] == 0 and rows[0]["strength"][-1] == cfg.sampler.strength_max
    # lerp and slerp share their endpoints but not their middles
    cfg.sampler.mu_start, cfg.sampler.mu_end = 0.0, 1.0
    lerp, _ = pegasus_grid(model, horses, birds, cfg.sampler, "lerp")
    slerp, _ = pegasus_grid(model, horses, birds, cfg.sampler, "slerp")
    lerp, slerp = lerp.view(8, 8, 3, 32, 32), slerp.view(8, 8, 3, 32, 32)
    assert torch.allclose(lerp[:, 0], slerp[:, 0], atol=1e-6)
    assert torch.allclose(lerp[:, -1], slerp[:, -1], atol=1e-6)
    assert not torch.equal(lerp[:, 4], slerp[:, 4])


@pytest.mark.parametrize("method", ["lerp", "analogy", "prior"])
def test_sample_methods_write_their_grid(trained, tmp_path, method):
    cli("sample", "--checkpoint", str(trained / "finetune"), "--method", method,
        "--out", str(tmp_path))
    with Image.open(tmp_path / f"{method}.png") as grid:
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)


@pytest.mark.parametrize("size", [64, 96])
def test_higher_resolution_end_to_end(tmp_path, size):
    shards = tmp_path / "shards"
    cli("prepare", "--source", "synthetic:120", "--out", str(shards), "--image-size", str(size))
    assert load_manifest(shards / "mix").image_size == size
    common = [f"data.shards={shards}", f"run.output_dir={tmp_path}", "train.max_steps=2",
              "wandb.mode=disabled", "data.batch_size=8", f"model.image_size={size}"]
    cli("train", "--config", str(REPO / "configs/smoke/pretrain.yaml"), *common)
    cli("train", "--config", str(REPO / "configs/smoke/finetune.yaml"), *common,
        f"train.init_from={tmp_path}/pretrain")
    with Image.open(tmp_path / "finetune/samples/pegasus.png") as grid:
        assert grid.size == (8 * (size + 2) + 2, 8 * (size + 2) + 2)


def test_report_shows_both_phases(trained, tmp_path):
    cli("report", str(trained), "--out", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    assert "<h2>pretrain (pretrain)</h2>" in page and "<h2>finetune (finetune)</h2>" in page
    assert page.count("<polyline") == 6  # loss, BCE and KL for each phase
    assert page.count("data:image/png;base64,") == 6  # pegasus, reconstructions, prior each
    assert page.count("held-out evaluation") == 2



def test_logistic_likelihood_and_resize_decoder_train_and_evaluate(smoke_shards, tmp_path):
    """model.likelihood=logistic with model.upsample=resize: the scale is learned and the
    held-out likelihood of 8-bit images beats the uniform one (ln 256 nats a value)."""
    cli("train", "--config", str(REPO / "configs/smoke/pretrain.yaml"), f"data.shards={smoke_shards}",
        f"run.output_dir={tmp_path}", "train.max_steps=150", "optim.warmup_steps=0",
        "wandb.mode=disabled", "model.likelihood=logistic", "model.upsample=resize",
        "train.log_every=10")
    run = tmp_path / "pretrain"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["pretrain/loss"] for row in logged if "pretrain/loss" in row]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    _, model, _ = load_trained_model(run, [])
    assert (model.log_scale != LOG_SCALE_INIT).all()  # each channel's scale is learned
    metrics = json.loads(next((run / "eval").glob("step_*.json")).read_text())["all"]
    assert 0 < metrics["recon_nats"] < 3 * 32 * 32 * math.log(256)
