"""Beyond the paper: held-out eval, contact sheet, lerp and the wing vector, 64/96 px, report."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import (
    PIPELINE_STEPS,
    SMOKE,
    TINY,
    TINY_ARGS,
    assert_tiles_show_images,
    cli_here,
    grid_tiles,
    run_cli,
)
from PIL import Image
from processes import REPO

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.prepare import prepare
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


def test_eval_runs_after_each_phase_and_is_consistent(smoke_pipeline, smoke_shards):
    # BCE on [0, 1] is at least the binary entropy of each target value: the held-out images'
    # own bound, per image; a model that outputs grey everywhere costs ln 2 a value.
    shard_set = ShardSet(smoke_shards / "eval")
    t = torch.stack([torch.from_numpy(shard_set.decode(s)) for s in shard_set]).double().div(255)
    t = t.clamp(1e-12, 1 - 1e-12)
    floor = float(-(t * t.log() + (1 - t) * (1 - t).log()).flatten(1).sum(1).mean())
    grey = 3 * 32 * 32 * math.log(2)
    for run in (smoke_pipeline.pretrain, smoke_pipeline.finetune):
        metrics = json.loads((run / "eval" / f"step_{PIPELINE_STEPS:08d}.json").read_text())
        assert metrics["all"]["images"] == load_manifest(smoke_shards / "eval").num_samples == len(t)
        assert floor < metrics["all"]["recon_nats"] < 1.2 * grey, (floor, metrics["all"])
        for subset in metrics.values():
            if not subset["images"]:
                continue
            assert subset["recon_nats"] > 0 and subset["kl_nats"] > 0
            assert subset["neg_elbo_nats"] == pytest.approx(subset["recon_nats"] + subset["kl_nats"])
            assert subset["bits_per_dim"] == pytest.approx(
                subset["neg_elbo_nats"] / (3 * 32 * 32 * math.log(2)))
            assert 0 <= subset["active_units"] <= subset["latent_dim"] == TINY.latent_dim
            assert 8 < subset["psnr_db"] < 40
    lines = (smoke_pipeline.finetune / "metrics.jsonl").read_text().splitlines()
    assert any("finetune/eval/all/neg_elbo_nats" in row for row in map(json.loads, lines))


def test_eval_command_matches_the_automatic_one(smoke_pipeline, tmp_path, capsys):
    run = smoke_pipeline.finetune
    code, out = cli_here(capsys, "eval", "--checkpoint", str(run), "--out", str(tmp_path / "e.json"))
    assert code == 0, out
    again = json.loads((tmp_path / "e.json").read_text())
    assert again == json.loads((run / f"eval/step_{PIPELINE_STEPS:08d}.json").read_text())


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


def test_wing_vector_at_strength_zero_reproduces_the_horses(smoke_pipeline, smoke_shards):
    cfg, model, _ = load_trained_model(smoke_pipeline.finetune, [])
    model.eval()
    horses, birds = pick_horses_and_birds(cfg.sampler, smoke_shards, 32)
    vector = attribute_vector(model, cfg.sampler, smoke_shards)
    assert vector.shape == (TINY.latent_dim,) and vector.norm() > 0
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


def test_each_sample_method_writes_its_grid_of_images(smoke_pipeline, tmp_path, capsys):
    for method in ("lerp", "analogy", "prior"):
        code, out = cli_here(capsys, "sample", "--checkpoint", str(smoke_pipeline.finetune),
                             "--method", method, "--out", str(tmp_path))
        assert code == 0, out
        tiles = grid_tiles(tmp_path / f"{method}.png", 32, 2)
        assert tiles.shape[:2] == (8, 8)
        assert_tiles_show_images(tiles, tmp_path / f"{method}.png")


@pytest.mark.process
@pytest.mark.parametrize("size", [64, 96])
def test_higher_resolution_end_to_end(tmp_path, size):
    """`pegasus-dist pipeline` at 64 and 96 px: shards, the classifier, both phases, their grids."""
    shards = tmp_path / "shards"
    prepare(PrepareConfig(sources=["synthetic:120"], out=str(shards), image_size=size), "tests")
    run_cli("pipeline", "--source", "synthetic:120", "--config-dir", str(REPO / "configs/smoke"),
            f"data.shards={shards}", f"run.output_dir={tmp_path}", "train.max_steps=2", "wandb.mode=disabled",
            "data.batch_size=8", f"model.image_size={size}", "quality.classifier_epochs=1", *TINY_ARGS)
    assert load_manifest(shards / "mix").image_size == size
    for phase in ("pretrain", "finetune"):
        layout = json.loads((tmp_path / phase / "samples/pegasus.json").read_text())
        assert layout["tile_size"] == size
        assert grid_tiles(tmp_path / phase / "samples/pegasus.png", size, 2).shape == (8, 8, size, size, 3)


def test_report_shows_both_phases(smoke_pipeline, tmp_path, capsys):
    code, out = cli_here(capsys, "report", str(smoke_pipeline.root), "--out", str(tmp_path / "report.html"))
    assert code == 0, out
    page = (tmp_path / "report.html").read_text()
    assert page.index("<h2>pretrain</h2>") < page.index("<h2>finetune</h2>")  # in the order they train
    assert page.count("<polyline") == 6  # loss, BCE and KL for each phase
    ends = re.findall(r"font-size='10'>([^<]+)</text><text x='2'", page)  # each curve's highest value
    assert len(ends) == 6 and all(re.fullmatch(r"[\d,]+|\d+(\.\d+)?", end) for end in ends), ends
    for run in (smoke_pipeline.pretrain, smoke_pipeline.finetune):  # each grid, as the PNG holds it
        for grid in ("pegasus", "reconstructions", "prior"):
            png = base64.b64encode((run / "samples" / f"{grid}.png").read_bytes()).decode()
            assert f"data:image/png;base64,{png}" in page, (run, grid)
    assert page.count("held-out evaluation") == 2


@pytest.mark.process
def test_logistic_likelihood_and_resize_decoder_train_and_evaluate(smoke_shards, tmp_path, capsys):
    """model.likelihood=logistic with model.upsample=resize: the scale is learned and the
    held-out likelihood of 8-bit images beats the uniform one (ln 256 nats a value)."""
    code, out = cli_here(capsys, "train", "--config", SMOKE, f"data.shards={smoke_shards}",
                         f"run.output_dir={tmp_path}", "train.max_steps=60", "optim.warmup_steps=0",
                         "optim.lr=0.01", "optim.lr_scaling=none", "wandb.mode=disabled",
                         "model.likelihood=logistic", "model.upsample=resize", "train.log_every=10",
                         *TINY_ARGS)
    assert code == 0, out[-3000:]
    run = tmp_path / "pretrain"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["pretrain/loss"] for row in logged if "pretrain/loss" in row]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses
    _, model, _ = load_trained_model(run, [])
    assert (model.log_scale != LOG_SCALE_INIT).all()  # each channel's scale is learned
    metrics = json.loads(next((run / "eval").glob("step_*.json")).read_text())["all"]
    assert 0 < metrics["recon_nats"] < 3 * 32 * 32 * math.log(256)
