"""The sample-quality classifier: trained on the mix's labels, measured on the held-out set, saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import DELETE, cli_here, field_words, with_field
from processes import REPO

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import load_config
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.errors import DataError
from pegasus_dist.evaluation.classifier import (
    META,
    WEIGHTS,
    Classifier,
    augment,
    find_classifier,
    held_out_accuracy,
    labelled_images,
    load_classifier,
    predict,
    save_classifier,
)


def test_it_separates_the_synthetic_classes_on_held_out_images(quality_classifier, quality_shards):
    folder, meta = quality_classifier
    assert meta["classes"] == ["bird", "car", "cat", "horse", "ship"]
    held_out = meta["held_out"]
    assert held_out["images"] >= 100
    assert held_out["accuracy"] >= 0.8  # chance is 0.2
    assert set(held_out["per_class"]) == set(meta["classes"])
    assert meta["generation"] == load_manifest(quality_shards / "mix").generation
    assert (folder / WEIGHTS).is_file() and json.loads((folder / META).read_text()) == meta


def test_a_loaded_classifier_predicts_as_the_saved_one_measured(quality_classifier, quality_shards):
    folder, meta = quality_classifier
    classifier = load_classifier(folder)
    assert held_out_accuracy(classifier, quality_shards / "eval") == meta["held_out"]
    images, labels = labelled_images(quality_shards / "eval", 32)
    probs, feats = predict(classifier, images.float() / 255)
    assert probs.shape == (len(labels), 5) and feats.shape == (len(labels), 128)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(labels)))


def test_a_missing_classifier_names_its_path_and_the_command(tmp_path):
    with pytest.raises(DataError) as err:
        load_classifier(tmp_path / "nothing")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nothing") in message
    assert "pegasus-dist classifier --config" in message


@pytest.mark.parametrize("damage", ["flipped", "truncated", "flipped, its sha256 removed"])
def test_a_damaged_classifier_is_refused_by_name_and_costs_a_phase_only_its_scores(
        quality_classifier, tmp_path, damage, caplog):
    folder = tmp_path / "classifier"
    shutil.copytree(quality_classifier[0], folder)
    meta = json.loads((folder / META).read_text())
    assert meta["weights_sha256"] == sha256_file(folder / WEIGHTS)
    raw = (folder / WEIGHTS).read_bytes()
    middle = len(raw) // 2
    (folder / WEIGHTS).write_bytes(raw[:middle] if damage == "truncated" else raw[:middle] + bytes(
        b ^ 0xFF for b in raw[middle : middle + 16]) + raw[middle + 16 :])
    refused = (f"{folder / WEIGHTS} does not match the sha256 in {folder / META}; re-create it with "
               "`pegasus-dist classifier --config CONFIG`")
    if damage.endswith("removed"):
        del meta["weights_sha256"]
        (folder / META).write_text(json.dumps(meta))
        refused = (f"{folder / META} lists no weights_sha256 to check {folder / WEIGHTS} by; re-create it "
                   "with `pegasus-dist classifier --config CONFIG`")
    with pytest.raises(DataError) as err:
        load_classifier(folder)
    assert str(err.value) == refused
    cfg = load_config(REPO / "configs/smoke/pretrain.yaml", [f"quality.classifier={folder}"])
    assert find_classifier(cfg) is None and f"skipping the quality scores: {refused}" in caplog.text


# Any field that is read, of another type, out of range or missing: (where, its damaged value).
META_DAMAGE = [("classes", DELETE), ("classes", "bird"), ("classes", []), ("classes[1]", 3), ("widths", None),
               ("widths", DELETE), ("widths", []), ("widths[0]", 0), ("widths[1]", "8"), ("widths[1]", 8.0),
               ("image_size", DELETE), ("image_size", -32), ("image_size", True), ("image_size", "32"),
               ("held_out", DELETE), ("held_out", [0.9]), ("held_out.accuracy", "high"), ("generation", 3),
               ("weights_sha256", 5)]
WHOLE_FILE_DAMAGE = [[], 5, None, "classifier", False]
RECREATE = "; re-create it with `pegasus-dist classifier --config CONFIG`"


@pytest.fixture
def small_classifier(tmp_path):
    """An untrained classifier of two classes saved as `pegasus-dist classifier` saves one: (folder, meta)."""
    meta = {"classes": ["bird", "horse"], "widths": [4, 8], "image_size": 32, "generation": "g",
            "held_out": {"images": 10, "accuracy": 0.5}, "epochs": 0}
    folder = tmp_path / "classifier"
    return folder, save_classifier(Classifier(meta["classes"], (4, 8), 32), meta, folder)


@pytest.mark.parametrize(("where", "value"), [*META_DAMAGE, *(("", v) for v in WHOLE_FILE_DAMAGE)])
def test_a_classifier_json_field_of_another_type_is_refused_in_one_line_and_costs_only_the_scores(
        small_classifier, where, value, caplog):
    folder, meta = small_classifier
    assert load_classifier(folder).classes == ["bird", "horse"]  # undamaged, it loads
    (folder / META).write_text(json.dumps(with_field(meta, where, value)))
    with pytest.raises(DataError) as refused:
        load_classifier(folder)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(folder / META)) and message.endswith(RECREATE)
    assert field_words(where, value) in message
    cfg = load_config(REPO / "configs/smoke/pretrain.yaml", [f"quality.classifier={folder}"])
    assert find_classifier(cfg) is None and f"skipping the quality scores: {message}" in caplog.text


# Fields of the right type that describe another network than the weights saved.
MISFITS = [("widths[1]", 9, "size mismatch for body.4.weight"),
           ("classes", ["a", "b", "c"], "size mismatch for head")]


@pytest.mark.parametrize(("where", "value", "mismatch"), MISFITS)
def test_a_classifier_json_that_does_not_fit_its_weights_is_refused_in_one_line(
        small_classifier, where, value, mismatch):
    folder, meta = small_classifier
    (folder / META).write_text(json.dumps(with_field(meta, where, value)))
    with pytest.raises(DataError) as refused:
        load_classifier(folder)
    message = str(refused.value)
    assert "\n" not in message and message.endswith(RECREATE)
    assert message.startswith(f"cannot load {folder / WEIGHTS} as {META} describes it (")
    assert mismatch in message


def test_augmentation_flips_and_shifts_each_image_without_changing_it_otherwise():
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for original, seen in zip(x, out, strict=True):
        padded = [torch.nn.functional.pad(v, (2, 2, 2, 2)) for v in (original, original.flip(2))]
        candidates = [p[:, dy : dy + 8, dx : dx + 8] for p in padded for dy in range(5) for dx in range(5)]
        assert any(torch.equal(seen, c) for c in candidates)
    assert not torch.equal(out, x)  # 16 images: some flip or shift


@pytest.mark.slow  # trains the classifier for an epoch
def test_the_classifier_command_writes_where_quality_classifier_says(quality_shards, tmp_path, capsys):
    out = tmp_path / "judge"
    code, printed = cli_here(capsys, "classifier", "--config", str(REPO / "configs/smoke/pretrain.yaml"),
                             f"data.shards={quality_shards}", f"quality.classifier={out}",
                             "quality.classifier_epochs=1")
    assert code == 0, printed
    meta = json.loads((out / META).read_text())
    assert meta["epochs"] == 1 and f"held-out accuracy {meta['held_out']['accuracy']:.3f}" in printed
    cfg = load_config(REPO / "configs/smoke/pretrain.yaml", ["run.output_dir=/x/y"])
    assert str(cfg.classifier_dir) == "/x/y/classifier"  # the default, shared by a pipeline's phases


def test_a_folder_in_place_of_classifier_json_is_one_line_when_it_is_saved_again(small_classifier):
    """The pipeline trains a damaged classifier again: its save into the folder's place was a traceback."""
    folder, meta = small_classifier
    (folder / "classifier.json").unlink()
    (folder / "classifier.json").mkdir()
    with pytest.raises(DataError, match=r"cannot write .*classifier.json \(Is a directory\); remove"):
        save_classifier(Classifier(meta["classes"], (4, 8), 32), meta, folder)
