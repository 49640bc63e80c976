"""The paper's VAE: layer structure and shapes for every supported image size."""

import pytest
import torch
from torch import nn

from pegasus_dist.config import ModelConfig
from pegasus_dist.model.vae import VAE, num_parameters, reparameterize


@pytest.mark.parametrize("size", [32, 64, 96])
def test_shapes_for_each_image_size(size):
    cfg = ModelConfig(image_size=size, channels=[8, 16, 16, 32], fc_dims=[64, 32, 16], latent_dim=8)
    model = VAE(cfg)
    x = torch.rand(3, 3, size, size)
    out = model(x)
    assert out.logits.shape == (3, 3, size, size)
    assert out.mu.shape == out.logvar.shape == (3, 8)
    images = model.decode(torch.randn(5, 8))
    assert images.shape == (5, 3, size, size)
    assert images.min() >= 0 and images.max() <= 1


def test_layers_follow_the_paper():
    model = VAE(ModelConfig())
    convs = [m for m in model.encoder_conv.modules() if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in model.decoder_conv.modules() if isinstance(m, nn.ConvTranspose2d)]
    enc_fc = [m for m in model.encoder_fc.modules() if isinstance(m, nn.Linear)]
    dec_fc = [m for m in model.decoder_fc.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == len(deconvs) == len(enc_fc) == len(dec_fc) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder_conv.modules()) == 4
    assert sum(isinstance(m, nn.LeakyReLU) for m in model.modules()) > 8
    assert enc_fc[-1].out_features == 2 * model.latent_dim  # mean and log-variance
    # The paper's 32x32 model at our widths: about 8.5 million parameters.
    assert 8_000_000 < num_parameters(model) < 9_000_000


def test_reparameterisation_uses_mu_sigma_and_eps():
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.log(torch.tensor([[4.0, 0.25]]))
    eps = torch.tensor([[0.5, 2.0]])
    assert torch.allclose(reparameterize(mu, logvar, eps), torch.tensor([[2.0, -1.0]]))


def test_forward_with_given_noise_is_deterministic():
    model = VAE(ModelConfig(channels=[4, 4, 4, 4], fc_dims=[8, 8, 8], latent_dim=4)).eval()
    x = torch.rand(2, 3, 32, 32)
    eps = torch.randn(2, 4)
    assert torch.equal(model(x, eps).logits, model(x, eps).logits)
    assert not torch.equal(model(x).logits, model(x).logits)  # fresh noise when not given


def test_resize_decoder_has_no_transposed_convolutions_and_keeps_shapes():
    cfg = ModelConfig(channels=[8, 16, 16, 32], fc_dims=[64, 32, 16], latent_dim=8, upsample="resize")
    model = VAE(cfg)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert sum(isinstance(m, nn.Upsample) for m in model.decoder_conv.modules()) == 4
    assert model(torch.rand(2, 3, 32, 32)).logits.shape == (2, 3, 32, 32)


def test_logistic_likelihood_learns_a_scale_per_channel():
    cfg = ModelConfig(channels=[4, 4, 4, 4], fc_dims=[8, 8, 8], latent_dim=4, likelihood="logistic")
    model = VAE(cfg)
    assert model.log_scale.shape == (3,) and model.log_scale.requires_grad
    assert model(torch.rand(2, 3, 32, 32)).log_scale is model.log_scale
    assert VAE(ModelConfig(channels=[4, 4, 4, 4], fc_dims=[8, 8, 8], latent_dim=4)).log_scale is None
