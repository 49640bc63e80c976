"""The loss terms of a micro-batch, and their sums over a log window, by name.

The terms stay on the device; at a sync point a window is reduced over the ranks with one all-reduce and one
host read (:func:`reduce_windows`), in the order of :data:`SUMS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from pegasus_dist.config import LossConfig


@dataclass(frozen=True)
class BatchLosses:
    """The loss terms of one micro-batch, per image, detached (0-dim device tensors); 0 for those off."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    critic: torch.Tensor  # ACAI's critic loss
    fooling: torch.Tensor  # the autoencoder's term against the critic
    discriminator: torch.Tensor  # the patch discriminator's loss
    generator: torch.Tensor  # the autoencoder's term against the discriminator
    matching: torch.Tensor  # feature matching: the reconstruction in the discriminator's features
    generator_weight: torch.Tensor  # the weight ``generator`` got (loss.patch_gan_adaptive)
    perceptual: torch.Tensor  # the reconstruction in a frozen classifier's features (training.perceptual)

    @classmethod
    def zeros(cls, device: torch.device) -> BatchLosses:
        return cls(*[torch.zeros((), device=device)] * len(TERMS))  # one tensor, shared


TERMS = tuple(f.name for f in fields(BatchLosses))
# A window's sums, in the order they travel in its one all-reduce.
SUMS = (*TERMS, "images", "bad_samples")
# The name a term is logged under when not its own, and the loss weight that must be on for it to be logged.
LOGGED = {"total": "loss", "critic": "acai_critic", "fooling": "acai_fooling",
          "discriminator": "patch_gan_discriminator", "generator": "patch_gan_generator",
          "matching": "feature_matching", "generator_weight": "patch_gan_adaptive_weight"}
WEIGHT = {"critic": "acai_weight", "fooling": "acai_weight", "discriminator": "patch_gan_weight",
          "generator": "patch_gan_weight", "matching": "feature_matching_weight",
          "generator_weight": "patch_gan_adaptive", "perceptual": "perceptual_weight"}


class Sums(SimpleNamespace):
    """A window's sums over every rank, an attribute per name of :data:`SUMS`: the terms
    image-weighted, then images and bad samples."""

    def means(self, loss: LossConfig) -> dict[str, float]:
        """Per-image means by logged name; the adversaries' only when they train; none without images."""
        if not self.images:
            return {}
        return {LOGGED.get(term, term): getattr(self, term) / self.images for term in TERMS
                if term not in WEIGHT or getattr(loss, WEIGHT[term])}


class Window:
    """Loss sums since the last log, on the device; the counts, host numbers, join them at the reduction."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(len(TERMS), device=self.device)  # image-weighted, in TERMS order
        self.images = self.bad_samples = 0
        self.steps = 0  # micro-batches added
        self.started = time.perf_counter()  # for the window's images per second

    def add(self, terms: BatchLosses, images: int, bad_samples: int) -> None:
        # The terms in the order of TERMS, one tensor: one device operation.
        self.losses += torch.stack([getattr(terms, name) for name in TERMS]) * images
        self.images += images
        self.bad_samples += bad_samples
        self.steps += 1


def reduce_windows(accelerator: Accelerator, *windows: Window) -> list[Sums]:
    """Each window's sums over every rank: one all-reduce and one host read for all of them."""
    losses = torch.stack([w.losses for w in windows])
    counts = losses.new_tensor([[w.images, w.bad_samples] for w in windows])
    rows = accelerator.reduce(torch.cat([losses, counts], dim=1), reduction="sum").tolist()
    return [Sums(**dict(zip(SUMS, row, strict=True))) for row in rows]
