"""The project's own image classifier, the judge of sample quality (pegasus_dist.evaluation.quality).

A small CNN trained by `pegasus-dist classifier` on ``mix``'s labelled images, measured on
``eval`` (README.md, "Sample quality"); its penultimate features are the Fréchet distance's space.
"""

from __future__ import annotations

import json
import logging
import os
import time
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_model
from torch import nn

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import Config, QualityConfig, field_problem
from pegasus_dist.data.loader import MemoryLoader
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.evaluation.classifier")

WEIGHTS, META = "classifier.safetensors", "classifier.json"
SHIFT = 2  # pixels of random translation (zero padding), the usual CIFAR augmentation
LR = 3e-3  # Adam's peak rate under the one-cycle schedule: few epochs need a high, decaying rate
EVAL_BATCH = 512
RECREATE = "re-create it with `pegasus-dist classifier --config CONFIG`"  # the fix of a damaged classifier
Positive = Annotated[int, Field(gt=0)]


class _HeldOut(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # images, per_class: recorded, never read back
    accuracy: float | None = None  # None: no held-out image of a known class


class _MetaFields(BaseModel):
    """The fields of ``classifier.json`` that are read, each of its type: strict, so "32" is no size."""
    model_config = ConfigDict(strict=True, extra="allow")  # epochs, seed...: recorded, never read back
    classes: list[str] = Field(min_length=1)
    widths: list[Positive] = Field(min_length=1)
    image_size: Positive
    held_out: _HeldOut
    generation: str | None = None  # of the shards it was trained on: the pipeline reuses it on those
    weights_sha256: str | None = None  # None is refused by read_meta, in words of its own


class Classifier(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> logits over ``classes``; ``features`` gives the pooled vector,
    ``activations`` each block's, the perceptual loss's space (training/perceptual.py)."""

    def __init__(self, classes: list[str], widths: tuple[int, ...], image_size: int) -> None:
        super().__init__()
        self.classes, self.widths, self.image_size = list(classes), tuple(widths), image_size
        self.meta: dict = {}  # classifier.json, once loaded
        self.body = nn.Sequential(*(layer for w_in, w_out in pairwise([3, *widths]) for layer in (
            nn.Conv2d(w_in, w_out, 3, padding=1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True),
            nn.MaxPool2d(2))))
        self.head = nn.Linear(widths[-1], len(classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.25).mean(dim=(2, 3))

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's ReLU output, before its pooling: from edges at full size to parts at 1/4."""
        found, x = [], (x - 0.5) / 0.25
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                found.append(x)
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def index(self, label: str) -> int:
        """The column of ``label``; a DataError when the classifier never learnt it."""
        if label not in self.classes:
            raise DataError(f"the classifier knows {', '.join(self.classes)}, not {label}; "
                            "train it on shards whose mix holds labelled images of that class")
        return self.classes.index(label)


@torch.no_grad()
def predict(classifier: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities (N, C), penultimate features (N, D)) of float images in [0, 1]."""
    classifier.eval()
    if not len(images):
        return torch.empty(0, len(classifier.classes)), torch.empty(0, classifier.widths[-1])
    feats = [classifier.features(chunk.float()) for chunk in images.split(EVAL_BATCH)]
    return torch.cat([classifier.head(f).softmax(dim=1) for f in feats]), torch.cat(feats)


def labelled_images(shard_set: str | Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The labelled images (uint8 N x 3 x H x W) of a shard set and their labels."""
    loader = MemoryLoader(shard_set, batch_size=1, rank=0, world_size=1, seed=0, image_size=image_size)
    keep = np.flatnonzero(loader.labels != None)  # noqa: E711 (an element-wise test of the object array)
    images = loader.images[torch.from_numpy(keep)].permute(0, 3, 1, 2).contiguous()  # N x 3 x H x W
    return images, loader.labels[keep].tolist()


def train_classifier(shards: str | Path, out: str | Path, quality: QualityConfig) -> dict:
    """Train on ``<shards>/mix``'s labelled images, test on ``eval``'s, save to ``out``; its meta."""
    epochs, batch_size, seed = (quality.classifier_epochs, quality.classifier_batch_size,
                                quality.classifier_seed)
    shards = Path(shards)
    manifest = load_manifest(shards / "mix")
    size = manifest.image_size
    images, labels = labelled_images(shards / "mix", size)
    if not labels:
        raise DataError(f"{manifest.path} holds no labelled images; the classifier needs labels")
    classes = sorted(set(labels))
    targets = torch.tensor([classes.index(label) for label in labels])
    torch.manual_seed(seed)
    model = Classifier(classes, tuple(quality.classifier_widths), size).to(memory_format=torch.channels_last)
    steps_per_epoch = -(-len(targets) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    log.info("classifier: %d labelled images of %d classes from %s, %d epochs",
             len(targets), len(classes), manifest.path, epochs)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            x = augment(images[rows].float().div_(255), generator).contiguous(
                memory_format=torch.channels_last)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            correct += int((logits.argmax(dim=1) == targets[rows]).sum())
        log.info("classifier epoch %d/%d: loss %.3f, training accuracy %.3f (%.0f s)", epoch + 1, epochs,
                 total / len(targets), correct / len(targets), time.perf_counter() - started)
    meta = {"classes": classes, "widths": quality.classifier_widths, "image_size": size, "epochs": epochs,
            "batch_size": batch_size, "seed": seed, "trained_on": str(manifest.path),
            "training_images": len(targets), "generation": manifest.generation,
            "training_seconds": round(time.perf_counter() - started, 1),
            "held_out": held_out_accuracy(model, shards / "eval")}
    return save_classifier(model, meta, out)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right with probability 1/2 and shifted by up to SHIFT pixels."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (SHIFT,) * 4)
    dy, dx = (torch.randint(0, 2 * SHIFT + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


def held_out_accuracy(classifier: Classifier, shard_set: str | Path) -> dict:
    """Accuracy on the labelled images of ``shard_set``, overall and per class (of those it knows)."""
    images, labels = labelled_images(shard_set, classifier.image_size)
    known = [i for i, label in enumerate(labels) if label in classifier.classes]
    if not known:
        return {"images": 0}
    probs, _ = predict(classifier, images[known].float().div(255))
    truth = torch.tensor([classifier.classes.index(labels[i]) for i in known])
    right = probs.argmax(dim=1) == truth
    per_class = {name: round(right[truth == c].float().mean().item(), 4)
                 for c, name in enumerate(classifier.classes) if (truth == c).any()}
    return {"images": len(known), "accuracy": round(right.float().mean().item(), 4), "per_class": per_class,
            "shard_set": str(Path(shard_set))}


def save_classifier(classifier: Classifier, meta: dict, folder: str | Path) -> dict:
    """Save atomically: weights, then ``classifier.json`` with their sha256 (what it returns) last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp"
    save_model(classifier, tmp, force_contiguous=True)  # channels_last weights, saved contiguous
    meta = {**meta, "weights_sha256": sha256_file(tmp)}
    os.replace(tmp, folder / WEIGHTS)
    (folder / f".{META}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    try:  # a folder in its place (a full disk fails above, as for any write of a file)
        os.replace(folder / f".{META}.tmp", folder / META)  # last: its presence means complete
    except OSError as err:
        raise DataError(f"cannot write {folder / META} ({err.strerror}); remove what is there") from None
    return meta


def read_meta(folder: str | Path) -> dict | None:
    """What ``classifier.json`` says, or None when the folder holds no classifier; a DataError when it is
    damaged: the JSON unreadable, a field missing or of another type, no sha256, or other weights."""
    folder = Path(folder)
    if not ((folder / META).is_file() and (folder / WEIGHTS).is_file()):
        return None
    try:
        meta = json.loads((folder / META).read_text())
        expected = _MetaFields.model_validate(meta).weights_sha256
    except ValidationError as err:  # before ValueError, its base class
        raise DataError(f"{field_problem(folder / META, err, _MetaFields)}; {RECREATE}") from None
    except (OSError, ValueError) as err:  # a bad encoding is a ValueError too
        raise DataError(f"{folder / META} is unreadable ({err}); {RECREATE}") from None
    if expected is None:  # what save_classifier always writes: weights that cannot be checked are not used
        raise DataError(f"{folder / META} lists no weights_sha256 to check {folder / WEIGHTS} by; {RECREATE}")
    if sha256_file(folder / WEIGHTS) != expected:
        raise DataError(f"{folder / WEIGHTS} does not match the sha256 in {folder / META}; {RECREATE}")
    return meta


def find_classifier(cfg: Config) -> Classifier | None:
    """The classifier at ``quality.classifier``, or None and one line saying why and how to create it: a
    damaged one costs only the quality scores, so the phase ends, never failing on a restart."""
    try:
        if read_meta(cfg.classifier_dir) is not None:
            return load_classifier(cfg.classifier_dir)
        log.info("no classifier at %s: skipping the quality scores; "
                 "`pegasus-dist classifier --config CONFIG` creates it", cfg.classifier_dir)
    except DataError as err:
        log.warning("skipping the quality scores: %s", err)
    return None


def load_classifier(folder: str | Path) -> Classifier:
    """The classifier saved in ``folder``; a DataError naming the command that creates it."""
    meta = read_meta(folder)
    if meta is None:
        raise DataError(f"no classifier at {folder} ({META} + {WEIGHTS}); create it with "
                        "`pegasus-dist classifier --config CONFIG` (it goes to quality.classifier)")
    weights = Path(folder) / WEIGHTS
    try:  # the weights are those saved (their sha256): a mismatch is classes or widths damaged
        classifier = Classifier(meta["classes"], tuple(meta["widths"]), meta["image_size"])
        classifier.load_state_dict(load_file(weights))
    except Exception as err:  # OSError, SafetensorError, a shape or key mismatch, a size too large
        detail = " ".join(str(err).split())  # torch's mismatch is several lines
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise DataError(f"cannot load {weights} as {META} describes it ({detail}); {RECREATE}") from None
    classifier.meta = {**meta, "path": str(folder)}
    return classifier.eval()
