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


def describe(module: nn.Module) -> list[tuple]:
    """Each leaf layer of ``module`` in order, with what defines it."""
    found = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            found.append((type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride,
                          m.padding, m.bias is not None))
        elif isinstance(m, nn.BatchNorm2d):
            found.append(("BatchNorm2d", m.num_features))
        elif isinstance(m, nn.LeakyReLU):
            found.append(("LeakyReLU", m.negative_slope))
        elif isinstance(m, nn.Linear):
            found.append(("Linear", m.in_features, m.out_features))
    return found


def test_layers_follow_the_paper():
    """Section 1.1, Figure 1: 4 stride-2 convolutions with batch norm and LeakyReLU, 4 linear
    layers to the mean and log-variance; mirrored by 4 linear layers and 4 transposed convolutions."""
    model = VAE(ModelConfig())  # widths 64-128-256-512, linear 512-512-256, 128 latents
    conv = lambda kind, a, b, bias=False: (kind, a, b, (4, 4), (2, 2), (1, 1), bias)  # noqa: E731
    relu = ("LeakyReLU", 0.2)
    assert describe(model.encoder_conv) == [
        conv("Conv2d", 3, 64), ("BatchNorm2d", 64), relu,
        conv("Conv2d", 64, 128), ("BatchNorm2d", 128), relu,
        conv("Conv2d", 128, 256), ("BatchNorm2d", 256), relu,
        conv("Conv2d", 256, 512), ("BatchNorm2d", 512), relu]
    flat = 512 * 2 * 2  # 32 px halved 4 times
    assert describe(model.encoder_fc) == [
        ("Linear", flat, 512), relu, ("Linear", 512, 512), relu, ("Linear", 512, 256), relu,
        ("Linear", 256, 2 * 128)]  # mean and log-variance: no activation
    assert describe(model.decoder_fc) == [
        ("Linear", 128, 256), relu, ("Linear", 256, 512), relu, ("Linear", 512, 512), relu,
        ("Linear", 512, flat), relu]
    assert describe(model.decoder_conv) == [
        conv("ConvTranspose2d", 512, 256), ("BatchNorm2d", 256), relu,
        conv("ConvTranspose2d", 256, 128), ("BatchNorm2d", 128), relu,
        conv("ConvTranspose2d", 128, 64), ("BatchNorm2d", 64), relu,
        conv("ConvTranspose2d", 64, 3, bias=True)]  # RGB logits: no norm, no activation
    # The paper's 32x32 model at our widths: about 8.5 million parameters.
    assert 8_000_000 < num_parameters(model) < 9_000_000


def test_each_stage_halves_then_doubles_the_side():
    cfg = ModelConfig(channels=[8, 16, 16, 32], fc_dims=[64, 32, 16], latent_dim=8)
    model = VAE(cfg).eval()
    shapes, h = [], torch.rand(2, 3, 32, 32)
    for block in model.encoder_conv:
        h = block(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    assert model.encoder_fc(h.flatten(1)).shape == (2, 16)
    h = model.decoder_fc(torch.randn(2, 8)).view(2, 32, 2, 2)
    shapes = []
    for block in model.decoder_conv:
        h = block(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(2, 16, 4, 4), (2, 16, 8, 8), (2, 8, 16, 16), (2, 3, 32, 32)]


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
