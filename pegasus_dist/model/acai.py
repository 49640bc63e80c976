"""ACAI, the interpolation regulariser the paper wished for (its reference [11]; Berthelot et al., ICLR 2019,
arXiv:1807.07543, Section 3): a critic C learns a in [0, 1/2] from decodes x_a = g(a z1 + (1 - a) z2) of the
latent means of global-batch neighbours (rows 2k, 2k + 1), and the autoencoder learns to fool it; ``a`` comes
from the step's generator (``TrainStep._noise``): the same on any number of processes."""

from __future__ import annotations

import torch
from torch import nn

from pegasus_dist.config import ModelConfig

ALPHA_MAX = 0.5  # predicted mixing coefficients are in [0, 1/2]: a and 1 - a give the same pair


class Critic(nn.Module):
    """The encoder's convolutions, then the mean of a 1-channel map: one scalar per image.
    No batch norm, so that an image's output does not depend on the rest of the batch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip([3, *cfg.channels[:-1]], cfg.channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                       nn.LeakyReLU(cfg.leaky_slope)]
        layers.append(nn.Conv2d(cfg.channels[-1], 1, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> the predicted mixing coefficient of each, (B,)."""
        return self.net(x).mean(dim=(1, 2, 3))


def partners(size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Each row's neighbour in the global batch (2k <-> 2k + 1), from row ``offset`` on; one on
    another process is replaced by the row before, a lone row pairs with itself (masked out)."""
    rows = torch.arange(size, device=device)
    partner = ((rows + offset) ^ 1) - offset
    outside = (partner < 0) | (partner >= size)
    return torch.where(outside, (rows - 1).clamp_min(0), partner)


def interpolation_mask(partner: torch.Tensor) -> torch.Tensor:
    """1.0 for rows mixed with another row, 0.0 for a row paired with itself."""
    return (partner != torch.arange(len(partner), device=partner.device)).float()


def mix_latents(mu: torch.Tensor, partner: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """a z1 + (1 - a) z2 for every row z1 and its partner z2."""
    a = alpha.to(mu.dtype)[:, None]
    return a * mu + (1 - a) * mu[partner]


def critic_loss(predicted_mix: torch.Tensor, alpha: torch.Tensor, predicted_blend: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """L_critic, per-image mean of |C(x_a) - a|^2 + |C(gamma x + (1 - gamma) g(f(x)))|^2, in float32."""
    return ((predicted_mix.float() - alpha).pow(2) * mask + predicted_blend.float().pow(2)).mean()


def fooling_loss(predicted_mix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The autoencoder's term, L_ae += lambda |C(x_a)|^2, before lambda: per-image mean of |C(x_a)|^2."""
    return (predicted_mix.float().pow(2) * mask).mean()


def blend(x: torch.Tensor, reconstruction: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma x + (1 - gamma) x_hat: the critic's regulariser input, out of the autoencoder's graph."""
    return (gamma * x + (1 - gamma) * reconstruction).detach()
