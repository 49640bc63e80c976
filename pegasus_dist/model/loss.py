"""The paper's loss, Equation (1): reconstruction NLL plus KL, summed over pixels (latent dimensions),
averaged over images: independent of batch size and process count. Options (README.md, "Beyond the paper"),
per image: a discretized logistic likelihood (PixelCNN++, Salimans et al. 2017; BCE is no likelihood of 8-bit
images, it pulls decodes to grey), KL warm-up (Bowman et al. 2016), free bits (Kingma et al. 2016, C.8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HALF_BIN = 0.5 / 255  # half the width of one of the 256 pixel levels on the [0, 1] scale
# The smallest log-scale: a level is then 1/255 / exp(-7) ~ 4 scale units wide, so the
# likelihood of the right level saturates instead of growing without bound.
LOG_SCALE_MIN = -7.0


@dataclass
class LossTerms:
    total: torch.Tensor  # recon + beta * kl (free bits applied), per image
    recon: torch.Tensor  # summed pixel negative log-likelihood (BCE or logistic), per image
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


def reconstruction_nll(logits: torch.Tensor, target: torch.Tensor,
                       log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image sum over pixels of -log p(x|z), (B,), in float32: the paper's BCE (``log_scale``
    None) or a discretized logistic of mean sigmoid(logits), scale exp(log_scale) per channel
    (the mass of the target's level, width 1/255; the first and last levels take the tails)."""
    logits, target = logits.float(), target.float()
    if log_scale is None:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)
    inv_scale = torch.exp(-log_scale.float().clamp_min(LOG_SCALE_MIN)[None, :, None, None])
    centered, half_level = (target - torch.sigmoid(logits)) * inv_scale, HALF_BIN * inv_scale
    upper, lower = centered + half_level, centered - half_level
    log_cdf_upper = F.logsigmoid(upper)  # log P(X <= x + half a level): the first level's
    log_sf_lower = F.logsigmoid(-lower)  # log P(X > x - half a level): the last level's
    # log(sigmoid(upper) - sigmoid(lower)), exact and finite for inner levels:
    # sigmoid(u) - sigmoid(l) = sigmoid(u) sigmoid(-l) (1 - exp(l - u)).
    log_inner = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(lower - upper))
    log_p = torch.where(target < HALF_BIN, log_cdf_upper,
                        torch.where(target > 1 - HALF_BIN, log_sf_lower, log_inner))
    return -log_p.flatten(1).sum(dim=1)


def vae_loss(logits: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0, free_bits: float = 0.0, log_scale: torch.Tensor | None = None) -> LossTerms:
    """Per-image mean of pixel NLL + beta * KL, each KL dimension counting at least ``free_bits``
    nats in the total; float32 whatever the autocast: bf16 would round sums of thousands badly."""
    recon = reconstruction_nll(logits, target, log_scale).mean()
    per_dim = kl_per_dimension(mu.float(), logvar.float())
    kl = per_dim.sum(dim=1).mean()
    charged = per_dim.clamp_min(free_bits).sum(dim=1).mean() if free_bits else kl
    return LossTerms(total=recon + beta * charged, recon=recon, kl=kl)
