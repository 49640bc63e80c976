"""The paper's Pegasus sampler (Section 1.4) and the grids written after each phase.

Pick 8 horses and 21 birds, encode them, pair every horse with a randomly
chosen bird, slerp between their latent means at 8 evenly spaced mu in
[0.4, 0.7], decode: 64 images in an 8x8 grid, one row per horse. Beside it we
write a grid of reconstructions and a grid of samples from the prior.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from pegasus_dist.checkpoint import load_model_weights, resolve_checkpoint
from pegasus_dist.config import SamplerConfig, load_config
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.shards import decode_image, iter_shard
from pegasus_dist.errors import DataError
from pegasus_dist.model import VAE
from pegasus_dist.slerp import slerp

GRID_PADDING = 2  # pixels between tiles, as torchvision's make_grid draws them


@dataclass
class LabelledImages:
    keys: list[str]
    images: torch.Tensor  # uint8 (N, 3, H, W)


@dataclass
class SampleOutputs:
    """What one sampler run wrote, by name: pegasus, reconstructions, prior."""

    paths: dict[str, Path]
    grids: dict[str, torch.Tensor]  # float (3, H, W) grids in [0, 1], for W&B


def pick_horses_and_birds(
    cfg: SamplerConfig, shards_root: str | Path, image_size: int
) -> tuple[LabelledImages, LabelledImages]:
    """The configured keys, or a seeded random choice of labelled horses and birds."""
    manifest = load_manifest(Path(shards_root) / cfg.shard_set)
    by_label: dict[str, list[str]] = {"horse": [], "bird": []}
    for path in manifest.shard_paths:
        for sample in iter_shard(path):
            label = sample.meta.get("label")
            if label in by_label:
                by_label[label].append(sample.key)
    rng = np.random.default_rng(cfg.seed)
    chosen = {}
    for label, keys, count in (
        ("horse", cfg.horse_keys, cfg.num_horses),
        ("bird", cfg.bird_keys, cfg.num_birds),
    ):
        available = by_label[label]
        if keys:
            missing = sorted(set(keys) - set(available))
            if missing:
                raise DataError(
                    f"sampler.{label}_keys: {', '.join(missing[:3])} not found among the {label}s "
                    f"of {manifest.path}; use keys from `pegasus-dist contact-sheet`"
                )
            chosen[label] = list(keys)
        elif len(available) < count:
            raise DataError(
                f"{manifest.path} holds {len(available)} labelled {label} images but the sampler "
                f"needs {count}; prepare more data or lower sampler.num_{label}s"
            )
        else:
            picks = rng.choice(len(available), size=count, replace=False)
            chosen[label] = [available[i] for i in picks]
    wanted = set(chosen["horse"]) | set(chosen["bird"])
    images = _load_images(manifest.shard_paths, wanted, image_size)
    horses, birds = (
        LabelledImages(keys, torch.stack([images[k] for k in keys]))
        for keys in (chosen["horse"], chosen["bird"])
    )
    return horses, birds


def _load_images(paths: list[Path], keys: set[str], image_size: int) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in paths:
        for sample in iter_shard(path):
            if sample.key in keys:
                array = decode_image(sample.png, image_size, where=f"{path}:{sample.key}")
                found[sample.key] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return found


def mu_values(cfg: SamplerConfig) -> torch.Tensor:
    return torch.linspace(cfg.mu_start, cfg.mu_end, cfg.num_mu)


@torch.no_grad()
def pegasus_grid(
    model: VAE, horses: LabelledImages, birds: LabelledImages, cfg: SamplerConfig
) -> tuple[torch.Tensor, list[dict]]:
    """(num_horses * num_mu) decoded slerps, row-major, and each row's horse and bird."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(cfg.seed + 1)  # the pairing draw is independent of the pick
    partners = rng.integers(0, len(birds.keys), size=len(horses.keys))
    mu_h, _ = model.encode(_to_float(horses.images, device))
    mu_b, _ = model.encode(_to_float(birds.images, device))
    mus = mu_values(cfg).to(device)
    z = slerp(mu_h[:, None, :], mu_b[partners][:, None, :], mus[None, :, None])
    images = model.decode(z.flatten(0, 1))
    rows = [
        {"row": i, "horse": horses.keys[i], "bird": birds.keys[j], "mu": mus.tolist()}
        for i, j in enumerate(partners.tolist())
    ]
    return images.float().cpu(), rows


@torch.no_grad()
def reconstruction_grid(model: VAE, horses: LabelledImages, birds: LabelledImages) -> torch.Tensor:
    """Rows: the horses, their reconstructions, birds, their reconstructions."""
    device = next(model.parameters()).device
    n = len(horses.keys)
    rows = []
    for images in (horses.images, birds.images[:n]):
        x = _to_float(images, device)
        mu, _ = model.encode(x)
        rows += [x, model.decode(mu)]
    return torch.cat(rows).float().cpu()


@torch.no_grad()
def prior_grid(model: VAE, count: int, seed: int) -> torch.Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(count, model.latent_dim, generator=generator).to(device)
    return model.decode(z).float().cpu()


def run_sampler(
    model: VAE, cfg: SamplerConfig, shards_root: str | Path, out_dir: str | Path
) -> SampleOutputs:
    """Write pegasus.png (+ .json), reconstructions.png and prior.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()  # batch norm uses its running statistics, as at inference
    try:
        horses, birds = pick_horses_and_birds(cfg, shards_root, model.image_size)
        pegasus, rows = pegasus_grid(model, horses, birds, cfg)
        images = {
            "pegasus": (pegasus, cfg.num_mu),
            "reconstructions": (reconstruction_grid(model, horses, birds), len(horses.keys)),
            "prior": (prior_grid(model, 64, cfg.seed), 8),
        }
    finally:
        model.train(was_training)
    paths, grids = {}, {}
    for name, (batch, per_row) in images.items():
        paths[name] = out_dir / f"{name}.png"
        grids[name] = make_grid(batch, nrow=per_row, padding=GRID_PADDING)
        save_image(batch, paths[name], nrow=per_row, padding=GRID_PADDING)
    layout = {
        "tile_size": model.image_size,
        "padding": GRID_PADDING,
        "columns": cfg.num_mu,
        "rows": rows,
        "shard_set": str(Path(shards_root) / cfg.shard_set),
    }
    (out_dir / "pegasus.json").write_text(json.dumps(layout, indent=2) + "\n")
    return SampleOutputs(paths=paths, grids=grids)


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).float().div_(255)


def sample_checkpoint(
    checkpoint: str | Path, overrides: list[str], out_dir: str | Path | None = None
) -> dict[str, Path]:
    """``pegasus-dist sample``: rebuild the model from a checkpoint's config and sample."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config(folder / "config.yaml", overrides)
    model = VAE(cfg.model)
    load_model_weights(model, folder)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    out = Path(out_dir) if out_dir else folder.parent.parent / "samples" / folder.name
    return run_sampler(model.to(device), cfg.sampler, cfg.data.shards, out).paths
