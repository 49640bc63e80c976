"""The perceptual loss (loss.perceptual_weight): reconstructions judged in a frozen classifier's features.

DFC-VAE (Hou et al. 2017, arXiv:1610.00291) replaces pixel distances by distances in a pretrained network's
hidden layers, pulling a decode towards what makes the image recognisable, not the blur that minimises a
per-pixel loss. Here the network is one of the project's own classifiers, trained apart from the grids' judge.
"""

from __future__ import annotations

import logging

import torch

from pegasus_dist.config import Config, QualityConfig
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation.classifier import RECREATE, Classifier, load_classifier, read_meta
from pegasus_dist.model.adversaries import feature_matching_loss

log = logging.getLogger("pegasus_dist.training.perceptual")


def load_perceptual_network(cfg: Config, device: torch.device) -> Classifier | None:
    """The frozen network of loss.perceptual_network on ``device`` (None when the loss is off);
    refused when it holds the judge's weights, wherever they were copied to."""
    if not cfg.loss.perceptual_weight:
        return None
    folder = cfg.loss.perceptual_network
    try:
        if read_meta(folder) is None:
            raise ConfigError(f"loss.perceptual_network={folder} holds no classifier; train it for the loss "
                              "with `pegasus-dist classifier --config CONFIG --for-loss`")
        network = load_classifier(folder)
    except DataError as err:  # damaged: the judge's fix, but this network is trained for the loss
        raise DataError(f"{str(err).removesuffix(RECREATE)}re-create it with `pegasus-dist classifier "
                        "--config CONFIG --for-loss`") from None
    judge = read_meta(cfg.classifier_dir)
    if judge is not None and judge["weights_sha256"] == network.meta["weights_sha256"]:
        raise ConfigError(f"loss.perceptual_network ({cfg.loss.perceptual_network}) holds the weights of "
                          f"quality.classifier ({cfg.classifier_dir}), the judge of the grids, which is "
                          "never trained against: train the loss's own with `pegasus-dist classifier "
                          "--config CONFIG --for-loss`")
    log.info("perceptual loss in the features of %s (widths %s, seed %s, weights sha256 %s)",
             cfg.loss.perceptual_network, network.meta["widths"], network.meta.get("seed"),
             network.meta["weights_sha256"][:12])
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return network.requires_grad_(False).to(device, memory_format=layout)


def network_recipe(cfg: Config) -> QualityConfig:
    """How loss.perceptual_network is trained (`classifier --for-loss`, `pipeline`): the judge's
    epochs and batch size, the loss's own folder, seed and widths."""
    return cfg.quality.model_copy(update={"classifier": cfg.loss.perceptual_network,
                                          "classifier_seed": cfg.loss.perceptual_seed,
                                          "classifier_widths": cfg.loss.perceptual_widths})


def perceptual_loss(network: Classifier, x: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Mean over the network's blocks of the mean L1 distance between the activations of ``x`` and
    of ``decoded``, in float32; the gradient reaches ``decoded`` only (the network is frozen)."""
    return feature_matching_loss(network.activations(torch.cat([x, decoded])), x.shape[0])
