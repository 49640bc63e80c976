"""The paper's loss, Equation (1): reconstruction cross-entropy plus KL.

Both terms are summed over pixels (resp. latent dimensions) and averaged over
the images of the batch, so the numbers are per image and do not depend on
the batch size or the number of processes.

Two options against the blur of a plain ELBO, both off by default:

- KL warm-up (``loss.kl_warmup_steps``): beta grows linearly from 0 over the
  first steps, so that the decoder learns to use the latent before the KL
  term pulls it to the prior (Bowman et al. 2016, "Generating Sentences from
  a Continuous Space"; Sonderby et al. 2016, "Ladder Variational Autoencoders");
- free bits (``loss.free_bits``): each latent dimension's KL counts at least
  lambda nats, so dimensions below it are not pushed further to the prior
  (Kingma et al. 2016, "Improved Variational Inference with Inverse
  Autoregressive Flow", Section C.8). The floor applies per image, not per
  batch as in that paper, so that the loss of a step does not depend on how
  the batch is shared among processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor  # recon + beta * kl (free bits applied), per image
    recon: torch.Tensor  # summed binary cross-entropy, per image
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), per image (the true KL, without free bits)


def kl_weight(beta: float, warmup_steps: int, step: int) -> float:
    """beta for the optimizer step taken after ``step`` steps: 0 -> beta over ``warmup_steps``."""
    return beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else beta


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Equation (2), per image: -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return kl_per_dimension(mu, logvar).sum(dim=1)


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Equation (2) before the sum: (B, latent_dim)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    free_bits: float = 0.0,
) -> LossTerms:
    """Per-image mean of (BCE summed over pixels) + beta * KL.

    With ``free_bits`` > 0 the KL in the total counts each dimension as at
    least that many nats. Computed in float32 whatever the autocast
    precision: the sums run over thousands of pixels, which bf16 would round badly.
    """
    logits, mu, logvar = logits.float(), mu.float(), logvar.float()
    recon = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    recon = recon.flatten(1).sum(dim=1).mean()
    per_dim = kl_per_dimension(mu, logvar)
    kl = per_dim.sum(dim=1).mean()
    charged = per_dim.clamp_min(free_bits).sum(dim=1).mean() if free_bits else kl
    return LossTerms(total=recon + beta * charged, recon=recon, kl=kl)
