"""Sample quality: the classifier's scores, the crossfade baseline, confident picks, the wiring."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import cli_here
from PIL import Image
from processes import BIN, REPO, run_bounded
from torchvision.transforms.functional import gaussian_blur
from torchvision.utils import save_image

from bench.heldout_agreement import agreement
from pegasus_dist.config import QualityConfig, load_config
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation.classifier import labelled_images, load_classifier, predict
from pegasus_dist.evaluation.quality import (
    crossfade,
    frechet_distance,
    read_grid,
    real_features,
    score_samples,
    tile_scores,
)
from pegasus_dist.evaluation.report import write_report
from pegasus_dist.evaluation.sampler import load_images, load_trained_model, pick_horses_and_birds
from pegasus_dist.pipeline import ensure_classifier


@pytest.fixture(scope="module")
def judge(quality_classifier):
    return load_classifier(quality_classifier[0])


@pytest.fixture(scope="module")
def real_tiles(quality_shards):
    """64 training horses and birds (not held out), floats in [0, 1]."""
    images, labels = labelled_images(quality_shards / "horse_bird", 32)
    return images[:64].float() / 255


@pytest.fixture(scope="module")
def trained_run(quality_shards, quality_classifier, tmp_path_factory):
    """A smoke pretrain of a few dozen steps that finds the classifier at quality.classifier."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = [f"data.shards={quality_shards}", f"run.output_dir={runs}", "train.max_steps=40",
                 "wandb.mode=disabled", f"quality.classifier={quality_classifier[0]}"]
    done = run_bounded([str(BIN / "pegasus-dist"), "train", "--config",
                        str(REPO / "configs/smoke/pretrain.yaml"), *overrides], timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    return runs / "pretrain", overrides, done.stdout


def test_frechet_distance_matches_its_closed_form():
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # b = 2a: covariance 4C, so tr(C + 4C - 2 (4 C^2)^1/2) = tr(C), plus the gap of the means
    expected = (a.mean(0) - 2 * a.mean(0)).pow(2).sum() + torch.cov(a.double().T).trace()
    assert frechet_distance(a, 2 * a) == pytest.approx(float(expected), rel=1e-6)
    shift = torch.tensor([3.0, 0, 0, 0, 0, 4.0])
    assert frechet_distance(a, a + shift) == pytest.approx(25, rel=1e-6)


def test_real_images_score_above_noise_and_blur(judge, quality_shards, real_tiles):
    real = real_features(judge, quality_shards / "eval")
    noise = torch.rand(real_tiles.shape, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(real_tiles, kernel_size=9, sigma=3.0)
    scores = {name: tile_scores(judge, tiles, real)
              for name, tiles in (("real", real_tiles), ("noise", noise), ("blur", blurred))}
    assert scores["real"]["frechet"] < scores["blur"]["frechet"]
    assert scores["real"]["frechet"] < scores["noise"]["frechet"]
    assert scores["real"]["horse_bird_mass"] > 0.9 > scores["noise"]["horse_bird_mass"]
    assert scores["real"]["pegasus_score"] < 0.2  # a real horse or bird is one or the other


def test_grids_are_read_back_tile_by_tile(tmp_path):
    tiles = torch.rand(26, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a partial last row
    save_image(tiles, tmp_path / "g.png", nrow=8, padding=2)
    read, per_row = read_grid(tmp_path / "g.png", 32, 2)
    assert per_row == 8 and read.shape == tiles.shape
    assert (read - tiles).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit pixels


def test_the_crossfade_is_of_exactly_the_pairs_and_mus_of_pegasus_json(judge, quality_shards, tmp_path):
    horse_bird = quality_shards / "horse_bird"
    labels = {s.key: s.meta["label"] for s in ShardSet(horse_bird)}
    horses, birds = (sorted(k for k, label in labels.items() if label == wanted)[:2]
                     for wanted in ("horse", "bird"))
    rows = [{"row": 0, "horse": horses[0], "bird": birds[1], "mu": [0.0, 0.25, 1.0]},
            {"row": 1, "horse": horses[1], "bird": birds[0], "mu": [0.5, 0.6, 0.9]}]
    found = load_images(ShardSet(horse_bird, 32), set(horses + birds))
    fade = crossfade(rows, found)
    h, b = found[horses[1]].float() / 255, found[birds[0]].float() / 255
    assert torch.allclose(fade[4], 0.4 * h + 0.6 * b, atol=0.5 / 255 + 1e-6)
    assert torch.equal(fade[0], found[horses[0]].float() / 255)  # mu = 0: the horse itself
    assert torch.equal(fade[2], found[birds[1]].float() / 255)  # mu = 1: its bird
    # A grid that is the crossfade itself scores exactly as its baseline.
    save_image(fade, tmp_path / "pegasus.png", nrow=3, padding=2)
    (tmp_path / "pegasus.json").write_text(json.dumps(
        {"tile_size": 32, "padding": 2, "columns": 3, "rows": rows, "shard_set": str(horse_bird)}))
    results = score_samples(tmp_path, judge, quality_shards / "eval")
    grid = results["grids"]["pegasus"]
    assert grid["tiles"] == 6 and grid["crossfade"] == {k: v for k, v in grid.items() if k != "crossfade"}
    assert json.loads((tmp_path / "quality.json").read_text()) == results


@pytest.mark.parametrize(("name", "damage", "why"), [
    ("pegasus.json", b'{"rows": [{"horse": "a", "bird": "b", "mu": [0.4', "is unreadable (JSONDecodeError: "),
    ("pegasus.json", b'{"rows": [{"horse": "a", "bird": "b", "mu": ["x"]}]}', "is not a grid layout"),
    ("pegasus.json", b'{"rows": [{"row": 0}]}', "is unreadable (KeyError: "),
    ("pegasus.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "is unreadable ("),
    ("pegasus.png", "grey", "is unreadable (L pixels, not the sampler's RGB)"),
    ("pegasus.png", "folder", "is unreadable ("),
    ("pegasus.json", "folder", "is unreadable ("),
])
def test_a_damaged_grid_or_layout_is_one_line_naming_it(judge, quality_shards, tmp_path, name, damage, why):
    """`score` (and the end of a phase) reads grids written earlier: damage is refused by name."""
    save_image(torch.rand(6, 3, 32, 32), tmp_path / "pegasus.png", nrow=3, padding=2)
    keys = sorted(s.key for s in ShardSet(quality_shards / "horse_bird"))
    rows = [{"row": 0, "horse": keys[0], "bird": keys[1], "mu": [0.4, 0.5, 0.6]}]
    (tmp_path / "pegasus.json").write_text(json.dumps({"tile_size": 32, "padding": 2, "rows": rows,
                                                       "shard_set": str(quality_shards / "horse_bird")}))
    if damage == "grey":  # a whole PNG of the grid's size, of grey pixels
        Image.open(tmp_path / name).convert("L").save(tmp_path / name)
    elif damage == "folder":
        (tmp_path / name).unlink()
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(damage)
    with pytest.raises(DataError) as refused:
        score_samples(tmp_path, judge, quality_shards / "eval")
    assert str(refused.value).startswith(f"{tmp_path / name} ") and why in str(refused.value)
    assert str(refused.value).endswith("write the grids again with `pegasus-dist sample --checkpoint RUN`")


@pytest.mark.process
def test_each_phase_scores_its_grids_and_logs_them(trained_run, judge):
    run, _, output = trained_run
    results = json.loads((run / "samples/quality.json").read_text())
    assert set(results["grids"]) == {"pegasus", "reconstructions", "prior"}
    pegasus = results["grids"]["pegasus"]
    assert pegasus["tiles"] == pegasus["crossfade"]["tiles"] == 64
    assert 0 <= pegasus["pegasus_score"] <= 0.5 and pegasus["frechet"] > 0
    recon = results["grids"]["reconstructions"]
    assert recon["tiles"] == 16 and 0 <= recon["recon_horse_as_horse"] <= 1
    assert recon["originals"]["horse_as_horse"] >= 0.75  # the originals are real horses
    assert "pegasus grid: pegasus score" in output and "(crossfade" in output
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("pretrain/quality/pegasus/crossfade/frechet") == pegasus["crossfade"]["frechet"]
               for row in logged)
    evaluated = json.loads(next((run / "eval").glob("*.json")).read_text())["horse_bird"]
    assert evaluated["horse_as_horse"] >= 0.75 and 0 <= evaluated["recon_horse_as_horse"] <= 1
    assert "recon_bird_as_bird" in evaluated and "recon_horse_as_horse" not in evaluated.get("all", {})
    page = write_report([run], run / "report.html").read_text()
    assert "sample quality" in page and "<td>pegasus grid: crossfade of the same pairs</td>" in page
    assert f"<td>{pegasus['pegasus_score']:.3f}</td>" in page
    assert f"<td>{recon['originals']['horse_as_horse']:.0%}</td>" in page
    headers = re.findall(r"<th>(.*?)</th>", page)  # in words, not the JSON's keys
    assert "negative ELBO, nats per image" in headers and not [h for h in headers if "_" in h], headers


@pytest.mark.process
def test_confident_picks_reconstruct_more_recognisably_than_random(trained_run, judge, quality_shards):
    run, overrides, _ = trained_run
    cfg, model, _ = load_trained_model(run, [])
    model.eval()
    picked = {}
    for pick in ("random", "confident"):
        cfg.sampler.pick = pick
        horses, _ = pick_horses_and_birds(cfg.sampler, quality_shards, 32, model, judge)
        with torch.no_grad():
            recon = model.decode(model.encode(horses.images.float() / 255)[0])
        picked[pick] = (horses.keys, predict(judge, recon)[0][:, judge.index("horse")].mean().item())
    assert picked["confident"][1] > picked["random"][1]
    cfg.sampler.pick = "random"
    assert pick_horses_and_birds(cfg.sampler, quality_shards, 32)[0].keys == picked["random"][0]
    cfg.sampler.pick = "confident"
    with pytest.raises(ConfigError, match="sampler.pick=confident needs the quality classifier"):
        pick_horses_and_birds(cfg.sampler, quality_shards, 32)


@pytest.mark.process
def test_the_sample_command_scores_what_it_wrote(trained_run, perceptual_network, tmp_path, capsys):
    run, overrides, _ = trained_run
    code, out = cli_here(capsys, "sample", "--checkpoint", str(run), "--out", str(tmp_path), *overrides[-1:],
                         "sampler.pick=confident")
    assert code == 0, out
    assert json.loads((tmp_path / "pegasus.json").read_text())["pick"] == "confident"
    scores = json.loads((tmp_path / "quality.json").read_text())["grids"]["pegasus"]
    assert f"pegasus score {scores['pegasus_score']:.2f}" in out
    # The same grids by a second classifier (a perceptual loss's network), beside the judge's scores.
    judged = (tmp_path / "quality.json").read_bytes()
    code, out = cli_here(capsys, "score", str(tmp_path), "--config", str(run / "config.yaml"),
                         "--out", str(tmp_path / "second.json"), f"quality.classifier={perceptual_network}")
    assert code == 0, out
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["classifier"]["path"] == str(perceptual_network)
    assert second["grids"]["pegasus"]["pegasus_score"] != scores["pegasus_score"]
    assert (tmp_path / "quality.json").read_bytes() == judged


@pytest.mark.slow
def test_the_pipeline_trains_a_classifier_again_only_when_its_recipe_changes(quality_shards, tmp_path):
    folder = tmp_path / "net"
    quality = QualityConfig(classifier=str(folder), classifier_epochs=1, classifier_batch_size=64,
                            classifier_widths=[8])
    ensure_classifier(str(quality_shards), folder, quality)
    weights = folder / "classifier.safetensors"
    trained = weights.stat().st_mtime_ns, weights.read_bytes()
    ensure_classifier(str(quality_shards), folder, quality)  # same shards, same recipe: reused
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == trained
    for change in ({"classifier_seed": 1}, {"classifier_widths": [8, 8]}):
        quality = quality.model_copy(update=change)
        ensure_classifier(str(quality_shards), folder, quality)
        meta = json.loads((folder / "classifier.json").read_text())
        assert (meta["seed"], meta["widths"]) == (quality.classifier_seed, quality.classifier_widths)
        assert weights.read_bytes() != trained[1]


def test_classifier_for_the_loss_needs_the_loss_s_folder(capsys):
    code, out = cli_here(capsys, "classifier", "--config", str(REPO / "configs/smoke/pretrain.yaml"),
                         "--for-loss")
    assert code == 2, out
    assert "--for-loss trains loss.perceptual_network" in out and "Traceback" not in out


@pytest.mark.parametrize(("override", "message"), [
    ("sampler.pick=best", "sampler.pick must be one of random, confident"),
    ("sampler.pick_pool=0", "sampler.pick_pool must be at least 1"),
    ("quality.classifier_epochs=0", "quality.classifier_epochs must be at least 1"),
    ("quality.classifier_batch_size=1", "quality.classifier_batch_size must be at least 2"),
    ("quality.classifier_seed=-1", "quality.classifier_seed must be 0 or more"),
    ("quality.classifier=[a]", "quality.classifier must be str"),
    ("quality.classifer=x", "did you mean quality.classifier?"),
])
def test_every_quality_option_refuses_a_bad_value_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.process
def test_the_heldout_agreement_reads_the_horses_as_eval_reads_them(trained_run, smoke_pipeline):
    run, other = trained_run[0], smoke_pipeline.finetune  # the judge and held-out set: the first run's
    found = agreement([run, other])
    evaluated = json.loads(next((run / "eval").glob("*.json")).read_text())["horse_bird"]
    counts = [found["runs"][str(r)]["horse"] for r in (run, other)]
    assert all(sum(found["runs"][str(r)]["read_as"].values()) == found["horses"] > 0 for r in (run, other))
    # The counts of `pegasus-dist eval`, from its fractions, for the originals and the reconstructions.
    assert found["originals"] == round(evaluated["horse_as_horse"] * found["horses"])
    assert counts[0] == round(evaluated["recon_horse_as_horse"] * found["horses"])
    assert counts[1] > counts[0]  # the finetuned run reconstructs horses that 40 steps do not
    assert found["every_run"] + found["some_run"] == sum(counts)  # |A and B| + |A or B| = |A| + |B|
