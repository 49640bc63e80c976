"""The networks trained against the autoencoder, in one :class:`Adversaries` (one prepared model, one Adam,
one checkpoint file): ACAI's critic and a patch discriminator, VAE-GAN's loss on decodes (arXiv:1512.09300)
as pix2pix's PatchGAN (arXiv:1611.07004) with SAGAN's hinge losses (arXiv:1805.08318), its feature matching
and VQGAN's adaptive weight (each loss's function gives its formula and source)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pegasus_dist.config import Config, ModelConfig
from pegasus_dist.model import acai

# VQGAN's floor on the adaptive weight's denominator and ceiling on the weight.
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4
# Each adversary: what it is, for messages, and the config key that turns it on.
KINDS = {"critic": ("ACAI critic", "loss.acai_weight"),
         "discriminator": ("patch discriminator", "loss.patch_gan_weight")}


class PatchDiscriminator(nn.Module):
    """A real/fake score per patch: ACAI's critic one stride-2 layer shallower, without its mean
    (a 32 px image gets 4 x 4 scores, each seeing about 22 px)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = acai.Critic(cfg.model_copy(update={"channels": cfg.channels[:-1] or cfg.channels})).net

    def forward(self, x: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images in [0, 1], (B, 3, H, W) -> (patch scores (B, 1, h, w), positive reads as real; the
        hidden layers' activations when ``features``, else [])."""
        hidden = []
        for layer in self.net:
            x = layer(x)
            if features and isinstance(layer, nn.LeakyReLU):
                hidden.append(x)
        return x, hidden


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), in float32."""
    return F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()


def feature_matching_loss(hidden: list[torch.Tensor], count: int) -> torch.Tensor:
    """L_FM = mean over layers l of mean |D_l(x) - D_l(x_hat)| (times loss.feature_matching_weight), in
    float32, of the first ``count`` rows (real images) against the rest (their decodes): VAE-GAN's learned
    similarity (Larsen et al. 2016, Section 2.2) as pix2pixHD's L1 over every hidden layer (Wang et al.
    2018, arXiv:1711.11585, Eq. 4)."""
    return torch.stack([(f[count:].float() - f[:count].float()).abs().mean() for f in hidden]).mean()


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean(D(x_hat)): the autoencoder's term before its weight, loss.patch_gan_weight."""
    return -fake.float().mean()


def adaptive_weight(recon: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor,
                    average: Callable[[torch.Tensor], torch.Tensor] = lambda grads: grads) -> torch.Tensor:
    """VQGAN's lambda = ||grad_L recon|| / (||grad_L L_G|| + 1e-4) <= 1e4, L the decoder's last layer
    (Esser et al. 2021, arXiv:2012.09841, Eq. 7; with loss.patch_gan_adaptive, L_G's weight is
    loss.patch_gan_weight times it), detached, of the gradients after ``average`` (in training, the mean
    over the ranks: one process's lambda for the same global batch). The graph is kept for the backward
    of the whole loss. Gradients that overflowed (fp16, a step its loss scaler drops) give 0, never NaN:
    a NaN here would stop the run as a NaN loss."""
    grads = torch.stack([torch.autograd.grad(term, last_layer, retain_graph=True)[0].float().flatten()
                         for term in (recon, generator)])
    recon_norm, generator_norm = average(grads).norm(dim=1)
    ratio = (recon_norm / (generator_norm + ADAPTIVE_EPS)).clamp(max=ADAPTIVE_MAX)
    return ratio.nan_to_num(nan=0.0).detach()


class Adversaries(nn.Module):
    """The adversaries the config turns on: ``critic`` (ACAI) and ``discriminator`` (patch GAN)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        on = enabled_adversaries(cfg)
        # Built in this order, so that a run with ACAI alone starts from the critic it always had.
        self.critic = acai.Critic(cfg.model) if "critic" in on else None
        self.discriminator = PatchDiscriminator(cfg.model) if "discriminator" in on else None

    def forward(self, critic_input: torch.Tensor | None, discriminator_input: torch.Tensor | None,
                features: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
        """Each adversary's output for its input (None for an input of None: the adversary is off),
        and the discriminator's hidden activations when ``features``."""
        patches, hidden = (None, []) if discriminator_input is None else self.discriminator(
            discriminator_input, features)
        return None if critic_input is None else self.critic(critic_input), patches, hidden


def enabled_adversaries(cfg: Config) -> set[str]:
    """The adversaries a run of ``cfg`` trains: those whose weight in KINDS is above 0."""
    return {kind for kind, (_, key) in KINDS.items() if getattr(cfg.loss, key.removeprefix("loss."))}
