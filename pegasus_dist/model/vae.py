"""The paper's convolutional VAE (Section 1.1, Figure 1): 4 stride-2 convolutions (batch norm, LeakyReLU) and
4 fully connected layers to the latent's mean and log-variance, mirrored by the decoder. The paper gives no
kernels or widths: 4x4 kernels halve or double the side exactly, widths are the config's. Decodes are logits
(BCE with logits is finite in bf16/fp16), with ``model.likelihood=logistic`` a discretized logistic's mean."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from pegasus_dist.config import ModelConfig

# The log-variance of q(z|x) is clamped, as in latent diffusion's VAE (Rombach et al. 2022): exp(logvar) stays
# finite however far one bad update throws the encoder, so that optim.DivergenceGuard names a diverging run
# instead of it overflowing to Inf. Healthy training stays far inside: a backstop.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# The logistic likelihood's initial log-scale per channel: a scale of 0.05 on [0, 1], about the pixel error of
# a trained model here, since Adam moves a parameter by about the learning rate per step (1e-3): from 0 it
# would take thousands of steps to get there.
LOG_SCALE_INIT = -3.0


@dataclass
class VAEOutput:
    logits: torch.Tensor  # (B, 3, H, W) pre-sigmoid reconstruction
    mu: torch.Tensor  # (B, latent_dim)
    logvar: torch.Tensor  # (B, latent_dim)
    log_scale: torch.Tensor | None = None  # model.likelihood=logistic: per colour channel, (3,)
    mixed_logits: torch.Tensor | None = None  # ACAI: logits of the decoded interpolants, (B, 3, H, W)


def _block(resize: nn.Module, c_out: int, slope: float) -> nn.Sequential:
    """``resize`` (a layer that halves or doubles the side), batch norm and LeakyReLU."""
    return nn.Sequential(resize, nn.BatchNorm2d(c_out), nn.LeakyReLU(slope))


def _upsample(c_in: int, c_out: int, how: str, bias: bool) -> nn.Module:
    """Twice the side: a 4x4 transposed convolution, or nearest-neighbour resize and a 3x3 conv."""
    if how == "transpose":
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias))


def _mlp(widths: list[int], slope: float, last_activation: bool) -> nn.Sequential:
    layers = [layer for w_in, w_out in pairwise(widths)
              for layer in (nn.Linear(w_in, w_out), nn.LeakyReLU(slope))]
    return nn.Sequential(*(layers if last_activation else layers[:-1]))


class VAE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, fc, slope = cfg.channels, cfg.fc_dims, cfg.leaky_slope
        self.latent_dim, self.image_size = cfg.latent_dim, cfg.image_size
        self.bottom = cfg.image_size // 2 ** len(c)  # side length after the 4 convs
        flat = c[-1] * self.bottom**2
        self.encoder_conv = nn.Sequential(*(
            _block(nn.Conv2d(w_in, w_out, kernel_size=4, stride=2, padding=1, bias=False), w_out, slope)
            for w_in, w_out in pairwise([3, *c])))
        self.encoder_fc = _mlp([flat, *fc, 2 * cfg.latent_dim], slope, last_activation=False)
        self.decoder_fc = _mlp([cfg.latent_dim, *fc[::-1], flat], slope, last_activation=True)
        rc = c[::-1]
        self.decoder_conv = nn.Sequential(
            *(_block(_upsample(a, b, cfg.upsample, bias=False), b, slope) for a, b in pairwise(rc)),
            # the last upsampling maps to RGB logits: no norm, no activation
            _upsample(rc[-1], 3, cfg.upsample, bias=True),
        )
        self.log_scale = (nn.Parameter(torch.full((3,), LOG_SCALE_INIT))
                          if cfg.likelihood == "logistic" else None)

    def last_layer(self) -> nn.Parameter:
        """The weight of the layer that writes the RGB logits, where VQGAN's adaptive weight is taken."""
        last = self.decoder_conv[-1]
        return (last[-1] if isinstance(last, nn.Sequential) else last).weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1], (B, 3, H, W) -> (mu, logvar) of q(z|x), logvar clamped."""
        mu, logvar = self.encoder_fc(self.encoder_conv(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_conv(self.decoder_fc(z).view(z.shape[0], -1, self.bottom, self.bottom))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (the paper's sigmoid output)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None,
                mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> VAEOutput:
        """Encode, sample z (noise ``eps``, drawn when None), decode. ``mix`` maps the latent means to ACAI's
        interpolants, decoded in one batch with the reconstructions: DDP sees one use of the model, and
        batch norm normalises them by real latents' statistics, as at sampling time (alone they lose
        the contrast and colour that tell them apart: the critic learns nothing)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, torch.randn_like(mu) if eps is None else eps)
        if mix is None:
            return VAEOutput(self.decode_logits(z), mu, logvar, self.log_scale)
        logits, mixed = self.decode_logits(torch.cat([z, mix(mu)])).chunk(2)
        return VAEOutput(logits, mu, logvar, self.log_scale, mixed)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, differentiable in mu and sigma (Kingma & Welling, 2014)."""
    return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
