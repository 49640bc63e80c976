"""Equation (1) and (2) of the paper against independent computations."""

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pegasus_dist.loss import kl_to_standard_normal, vae_loss


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 10), torch.randn(6, 10)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(dim=1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-5)


def test_kl_is_zero_at_the_prior():
    assert torch.equal(kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_loss_is_summed_bce_plus_beta_kl_per_image():
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    terms = vae_loss(logits, target, mu, logvar, beta=0.5)
    # BCE on the sigmoid output, summed over the 192 pixel values, averaged over images
    bce = F.binary_cross_entropy(torch.sigmoid(logits), target, reduction="sum") / 4
    assert torch.allclose(terms.recon, bce, rtol=1e-5)
    assert torch.allclose(terms.kl, kl_to_standard_normal(mu, logvar).mean())
    assert torch.allclose(terms.total, terms.recon + 0.5 * terms.kl)


def test_loss_is_float32_under_bf16_inputs():
    logits = torch.randn(2, 3, 4, 4).bfloat16()
    terms = vae_loss(logits, torch.rand(2, 3, 4, 4), torch.zeros(2, 2).bfloat16(),
                     torch.zeros(2, 2).bfloat16())
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
