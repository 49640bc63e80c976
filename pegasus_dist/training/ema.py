"""An exponential moving average of the VAE's weights (``train.ema_decay``), what the grids show.

Averaged weights sample sharper than the last step's (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Section 3; Yazıcı et al. 2019 for GANs).
Every rank keeps the same average, saved as ``ema.safetensors`` and restored to the bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pegasus_dist.model.saved import EMA, load_model_weights

log = logging.getLogger("pegasus_dist.training.ema")


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The average of ``model`` (unwrapped), its buffers (batch norm's statistics) included."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def restore_ema(ema: AveragedModel, folder: Path) -> None:
    """The average saved in checkpoint ``folder``; one that holds none starts from its weights."""
    if (folder / EMA).is_file():
        load_model_weights(ema.module, folder, EMA)
        ema.n_averaged.fill_(1)  # averaging from here on, as the uninterrupted run does
    else:
        log.warning("%s holds no %s (its run had train.ema_decay=0): the average starts from its "
                    "weights", folder, EMA)
