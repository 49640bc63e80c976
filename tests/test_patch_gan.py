"""The patch discriminator (pegasus_dist/model/adversaries.py): patch scores, hinge losses, feature
matching, it learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import train_ranks
from safetensors.torch import load_file

from pegasus_dist.config import ModelConfig
from pegasus_dist.model.adversaries import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from pegasus_dist.model.loss import vae_loss
from pegasus_dist.model.vae import VAE

# relu(1 - c) + relu(1 + c) >= 2 for any constant score c: what a discriminator that learned nothing pays.
CHANCE = 2.0


def test_the_discriminator_scores_4x4_patches_of_a_32px_image_independently_of_the_batch():
    discriminator = PatchDiscriminator(ModelConfig(channels=[8, 8, 8, 8]))
    x = torch.rand(4, 3, 32, 32)
    assert discriminator(x)[0].shape == (4, 1, 4, 4)
    assert torch.allclose(discriminator(x[:1])[0], discriminator(x)[0][:1], atol=1e-6)  # no batch norm


def test_feature_matching_pulls_decodes_toward_the_real_images_in_the_discriminators_features():
    """Real images and decodes share one forward (reals first); only the decodes get gradients."""
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(ModelConfig(channels=[8, 8, 8, 8]))
    frozen = {name: value.detach() for name, value in discriminator.named_parameters()}
    real = torch.rand(4, 3, 32, 32)
    fake = torch.rand(4, 3, 32, 32, requires_grad=True)

    def matching(decodes: torch.Tensor) -> torch.Tensor:
        _, hidden = torch.func.functional_call(discriminator, frozen, (torch.cat([real, decodes]),),
                                               {"features": True})
        return feature_matching_loss(hidden, len(real))

    assert matching(real).item() == 0
    apart = [(f - r).abs().mean() for f, r in zip(discriminator(fake, True)[1], discriminator(real, True)[1],
                                                  strict=True)]
    assert len(apart) == 3 and matching(fake).item() == pytest.approx(torch.stack(apart).mean().item())
    before = matching(fake)
    before.backward()
    assert all(p.grad is None for p in discriminator.parameters())  # trained by its own loss only
    moved = (fake - 0.01 * fake.grad.sign()).detach()
    assert matching(moved).item() < 0.99 * before.item()


def test_hinge_losses():
    sure, unsure = torch.full((2, 1, 4, 4), 3.0), torch.zeros(2, 1, 4, 4)
    assert discriminator_loss(sure, -sure).item() == 0  # beyond the margin on both sides
    assert discriminator_loss(unsure, unsure).item() == CHANCE
    assert discriminator_loss(-sure, sure).item() == 8  # 4 + 4: fooled both ways
    fake = torch.tensor([[[[1.0, -3.0]]]])
    assert generator_loss(fake).item() == 1.0  # minus the mean score of the decodes


def test_the_adaptive_weight_gives_the_hinge_term_the_likelihoods_pull_on_the_last_layer():
    torch.manual_seed(0)
    tiny = ModelConfig(channels=[4, 4, 8, 8], fc_dims=[16, 16, 8], latent_dim=4)
    vae, discriminator = VAE(tiny).eval(), PatchDiscriminator(tiny)  # eval: batch norm per image
    last = vae.last_layer()
    assert last.shape[0] == 3 or last.shape[1] == 3  # the layer that writes RGB

    def terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = vae(x, torch.zeros(len(x), tiny.latent_dim))
        recon = vae_loss(out.logits, x, out.mu, out.logvar).recon
        # Scores 1,000 times a fresh discriminator's, as a trained one's: its gradient at the last
        # layer (1e-2 here) well above VQGAN's floor of 1e-4 on the denominator.
        return recon, 1000 * generator_loss(discriminator(torch.sigmoid(out.logits))[0])

    def grad(term: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(term, last, retain_graph=True)[0]

    x = torch.rand(8, 3, 32, 32)
    recon, generator = terms(x)
    weight = adaptive_weight(recon, generator, last)
    assert not weight.requires_grad
    # Equal pulls, but for the floor's share: 1e-4 of the 1e-2.
    assert grad(weight * generator).norm().item() == pytest.approx(grad(recon).norm().item(), rel=0.011)
    # The likelihood in other units (nats per pixel): the weight follows, the balance holds.
    per_pixel = adaptive_weight(recon / 3072, generator, last)
    assert per_pixel.item() == pytest.approx(weight.item() / 3072, rel=1e-4)
    # Two ranks with half the batch each, their gradients averaged: the whole batch's weight.
    other = torch.stack([grad(t).flatten() for t in terms(x[4:])])
    halves = adaptive_weight(*terms(x[:4]), last, average=lambda mine: (mine + other) / 2)
    assert halves.item() == pytest.approx(weight.item(), rel=1e-4)
    assert adaptive_weight(*terms(x[:4]), last).item() != pytest.approx(weight.item(), rel=1e-2)
    # Scaled alike (fp16's loss scale), the same weight but for the floor's share; overflowed, 0, not NaN.
    scaled = adaptive_weight(65536 * recon, 65536 * generator, last)
    assert scaled.item() == pytest.approx(weight.item(), rel=0.011)
    assert adaptive_weight(recon * math.inf, generator * math.inf, last).item() == 0


@pytest.mark.process
def test_the_discriminator_learns_and_is_checkpointed(smoke_shards, tmp_path):
    # A small weight, so that the autoencoder hardly fights back and what is measured is the discriminator.
    train_ranks(1, [f"data.shards={smoke_shards}", f"run.output_dir={tmp_path}", "train.max_steps=120",
                    "train.epochs=100", "optim.warmup_steps=0", "loss.patch_gan_weight=1",
                    "loss.feature_matching_weight=1",
                    "wandb.mode=disabled", "train.log_every=10"])
    run = tmp_path / "pretrain"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    discriminator = [r["pretrain/patch_gan_discriminator"] for r in rows
                     if "pretrain/patch_gan_discriminator" in r]
    generator = [r["pretrain/patch_gan_generator"] for r in rows if "pretrain/patch_gan_generator" in r]
    matching = [r["pretrain/feature_matching"] for r in rows if "pretrain/feature_matching" in r]
    assert len(discriminator) == len(generator) == len(matching) == 12
    assert all(m > 0 for m in matching)  # decodes are never their images, in the features either
    assert all(map(math.isfinite, discriminator + generator))
    assert sum(discriminator[-3:]) / 3 < 0.8 * CHANCE, discriminator
    assert sum(generator[-3:]) / 3 > 0, generator  # the decodes score as fake: D(x_hat) < 0
    weights = load_file(run / "checkpoints/step_00000120/model_1.safetensors")
    assert {name.split(".")[0] for name in weights} == {"discriminator"}
    assert "pretrain/acai_critic" not in rows[-1]  # ACAI stays off
