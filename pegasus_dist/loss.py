"""The paper's loss, Equation (1): reconstruction cross-entropy plus KL.

Both terms are summed over pixels (resp. latent dimensions) and averaged over
the images of the batch, so the numbers are per image and do not depend on
the batch size or the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor  # recon + beta * kl, per image
    recon: torch.Tensor  # summed binary cross-entropy, per image
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), per image


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Equation (2), per image: -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def vae_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
) -> LossTerms:
    """Per-image mean of (BCE summed over pixels) + beta * KL.

    Computed in float32 whatever the autocast precision: the sums run over
    thousands of pixels, which bf16 would round badly.
    """
    logits, mu, logvar = logits.float(), mu.float(), logvar.float()
    recon = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    recon = recon.flatten(1).sum(dim=1).mean()
    kl = kl_to_standard_normal(mu, logvar).mean()
    return LossTerms(total=recon + beta * kl, recon=recon, kl=kl)
