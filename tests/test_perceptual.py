"""The perceptual loss (pegasus_dist/training/perceptual.py): distances in a frozen classifier's blocks,
and never in the judge's. Its training, resume and ranks are tested with the adversaries' (test_acai.py,
test_faults.py), where it runs beside them."""

from __future__ import annotations

import shutil

import pytest
import torch

from pegasus_dist.config import load_config
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation.classifier import Classifier, save_classifier
from pegasus_dist.training.perceptual import load_perceptual_network, perceptual_loss


def saved_classifier(folder, seed: int) -> None:
    torch.manual_seed(seed)
    meta = {"classes": ["bird", "horse"], "widths": [4, 8], "image_size": 32, "seed": seed, "held_out": {}}
    save_classifier(Classifier(meta["classes"], (4, 8), 32), meta, folder)


def test_the_loss_pulls_decodes_toward_their_images_in_every_block_of_the_frozen_network():
    torch.manual_seed(0)
    network = Classifier(["bird", "horse"], (4, 8, 8), 32).eval().requires_grad_(False)
    real = torch.rand(4, 3, 32, 32)
    fake = torch.rand(4, 3, 32, 32, requires_grad=True)
    assert perceptual_loss(network, real, real).item() == 0
    blocks = [(f - r).abs().mean() for f, r in zip(network.activations(fake), network.activations(real),
                                                   strict=True)]
    assert [a.shape[-1] for a in network.activations(real)] == [32, 16, 8]  # before each pooling
    assert perceptual_loss(network, real, fake).item() == pytest.approx(torch.stack(blocks).mean().item())
    before = perceptual_loss(network, real, fake)
    before.backward()
    assert all(p.grad is None for p in network.parameters())
    moved = (fake - 0.01 * fake.grad.sign()).detach()
    assert perceptual_loss(network, real, moved).item() < 0.99 * before.item()


def test_the_network_is_loaded_frozen_and_never_the_judge_copied_elsewhere(tmp_path):
    saved_classifier(tmp_path / "judge", seed=0)
    saved_classifier(tmp_path / "other", seed=1)
    shutil.copytree(tmp_path / "judge", tmp_path / "copy")

    def config(network: str):
        return load_config(None, [f"quality.classifier={tmp_path / 'judge'}", "loss.perceptual_weight=1",
                                  f"loss.perceptual_network={tmp_path / network}"])

    network = load_perceptual_network(config("other"), torch.device("cpu"))
    assert network.widths == (4, 8) and not any(p.requires_grad for p in network.parameters())
    assert not network.training  # batch norm's running statistics, never the batch's
    assert network.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match=r"holds the weights of quality.classifier .* judge of the grids"):
        load_perceptual_network(config("copy"), torch.device("cpu"))
    assert load_perceptual_network(load_config(None, []), torch.device("cpu")) is None
    with pytest.raises(ConfigError, match=r"/missing holds no classifier; train it .* --for-loss"):
        load_perceptual_network(config("missing"), torch.device("cpu"))
    (tmp_path / "other" / "classifier.safetensors").write_bytes(b"damaged")
    with pytest.raises(DataError, match=r"does not match the sha256 .*; re-create it with `pegasus-dist "
                                        r"classifier --config CONFIG --for-loss`$"):
        load_perceptual_network(config("other"), torch.device("cpu"))
