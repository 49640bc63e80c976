"""Equation (1) and (2) of the paper against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pegasus_dist.model.loss import kl_to_standard_normal, reconstruction_nll, vae_loss


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
    torch.manual_seed(2)
    logits, target = torch.randn(2, 3, 4, 4).bfloat16(), torch.rand(2, 3, 4, 4)
    mu, logvar = torch.randn(2, 2).bfloat16(), torch.randn(2, 2).bfloat16()
    terms = vae_loss(logits, target, mu, logvar)
    assert terms.total.dtype == terms.recon.dtype == terms.kl.dtype == torch.float32
    # exactly the float32 loss of the same (bf16-rounded) values: nothing summed in bf16
    exact = vae_loss(logits.float(), target, mu.float(), logvar.float())
    assert torch.equal(terms.total, exact.total) and torch.equal(terms.kl, exact.kl)
    bce = F.binary_cross_entropy(torch.sigmoid(logits.double()), target.double(), reduction="sum") / 2
    assert terms.recon.item() == pytest.approx(bce.item(), rel=1e-5)


def _logistic_level_probabilities(logits: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """exp(-NLL) of every one of the 256 levels for one pixel per channel: (256, 3)."""
    levels = torch.arange(256.0) / 255
    target = levels[:, None, None, None].expand(256, 3, 1, 1)
    per_pixel = [torch.exp(-reconstruction_nll(logits[:, c:c + 1], target[:, c:c + 1],
                                               log_scale[c:c + 1])) for c in range(3)]
    return torch.stack(per_pixel, dim=1)


def test_discretized_logistic_is_a_distribution_over_the_256_levels():
    means = torch.tensor([-3.0, 0.2, 2.5])
    logits = means.view(1, 3, 1, 1).expand(256, 3, 1, 1)
    for log_scale in (torch.tensor([-5.0, -3.0, -1.0]), torch.full((3,), -7.0)):
        probs = _logistic_level_probabilities(logits, log_scale)
        assert torch.allclose(probs.sum(dim=0), torch.ones(3), atol=1e-4)
    # narrow: the most likely level is the one nearest the mean sigmoid(logit)
    assert torch.equal(probs.argmax(dim=0), (torch.sigmoid(means) * 255).round().long())


def test_discretized_logistic_matches_the_cdf_difference():
    logits, target = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 100 / 255)
    log_scale = torch.tensor([-2.5])
    mean, scale = torch.sigmoid(torch.tensor(0.3)), torch.exp(torch.tensor(-2.5))
    cdf = lambda v: torch.sigmoid((v - mean) / scale)  # noqa: E731
    expected = -torch.log(cdf(torch.tensor(100.5 / 255)) - cdf(torch.tensor(99.5 / 255)))
    assert torch.allclose(reconstruction_nll(logits, target, log_scale), expected, rtol=1e-5)


def test_logistic_loss_sharpens_with_a_smaller_scale_only_when_the_mean_is_right():
    target = torch.full((1, 3, 4, 4), 128 / 255)
    right = torch.logit(target)
    wrong = torch.logit(torch.full_like(target, 0.3))
    wide, narrow = torch.full((3,), -2.0), torch.full((3,), -6.0)
    assert reconstruction_nll(right, target, narrow) < reconstruction_nll(right, target, wide)
    assert reconstruction_nll(wrong, target, narrow) > reconstruction_nll(wrong, target, wide)
    # A far narrower scale than LOG_SCALE_MIN (-7) counts as -7: a wrong mean costs a finite,
    # known amount. 128/255 is 0.2 above the mean 0.3, ~219 scale units: the probability of its
    # level is sigmoid(-l) - sigmoid(-u), l and u its edges in scale units (float64, no rounding to 1).
    s = math.exp(-7)
    lower, upper = (128 / 255 - 0.3 - 0.5 / 255) / s, (128 / 255 - 0.3 + 0.5 / 255) / s
    per_value = -math.log(1 / (1 + math.exp(lower)) - 1 / (1 + math.exp(upper)))
    assert 219 < per_value < 221
    for log_scale in (-30.0, -7.0):
        nll = reconstruction_nll(wrong, target, torch.full((3,), log_scale))
        assert nll.item() == pytest.approx(48 * per_value, rel=1e-4)
