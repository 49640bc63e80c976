"""`pegasus-dist eval`: how well a checkpoint models the held-out images. Per image of the ``eval`` shard set:
negative ELBO (nats, bits/dim), its parts, PSNR and active latent units, for all images and for the horses and
birds (with the classifier, the fractions recognised as their label); README.md, "Beyond the paper", says how
to read them."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from pegasus_dist.data.loader import ShardLoader
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.evaluation.classifier import Classifier, predict
from pegasus_dist.model.loss import kl_to_standard_normal, reconstruction_nll
from pegasus_dist.model.vae import VAE, reparameterize

ACTIVE_UNIT_THRESHOLD = 0.01
DESCRIPTIVE = ("images", "latent_dim", "active_unit_threshold")  # they describe the evaluation, not the model
SUBSETS = {"all": None, "horse_bird": ("horse", "bird")}


def leak(trained_on: str, held_out: str | Path) -> str | None:
    """Why ``held_out`` may hold images that a model trained on ``trained_on`` (``<set>@<generation>``, its
    checkpoint's ``shards``) has seen, or None: a new ``prepare`` draws another held-out split. No held-out
    set there (no manifest) is None too: its readers say so themselves."""
    generation = trained_on.partition("@")[2]
    if not generation or not (Path(held_out) / "manifest.json").is_file():
        return None
    if not (now := load_manifest(held_out).generation) or generation == now:
        return None
    return (f"{held_out} is of shard generation {now}, but the model trained on {trained_on}: the shards "
            "were prepared again since, so held-out images may be ones it trained on")


@torch.no_grad()
def evaluate(model: VAE, shard_set: str | Path, batch_size: int = 256, seed: int = 0,
             classifier: Classifier | None = None) -> dict:
    """Metrics of ``model`` on every image of ``shard_set``, for each subset."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = ShardLoader(shard_set, batch_size, rank=0, world_size=1, num_workers=0, seed=seed,
                         image_size=model.image_size)
    loader.set_epoch(0)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    labels: list[str | None] = []
    for batch in loader:
        x = batch.images.to(device).float().div_(255)
        mu, logvar = model.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=device)
        logits = model.decode_logits(reparameterize(mu, logvar, eps))
        mse = (model.decode(mu) - x).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
        rows["recon"].append(reconstruction_nll(logits, x, model.log_scale))
        rows["kl"].append(kl_to_standard_normal(mu, logvar))
        rows["psnr"].append(-10 * torch.log10(mse))
        rows["mu"].append(mu)
        if classifier is not None:  # the classes it sees in the originals and their reconstructions
            rows["seen"].append(predict(classifier, x.cpu())[0].argmax(dim=1))
            rows["seen_recon"].append(predict(classifier, model.decode(mu).float().cpu())[0].argmax(dim=1))
        labels += batch.labels
    model.train(was_training)
    data = {k: torch.cat(v).float().cpu() for k, v in rows.items() if v}
    dims = 3 * model.image_size**2
    metrics = {name: _summary(data, [wanted is None or label in wanted for label in labels], dims)
               for name, wanted in SUBSETS.items()}
    if classifier is not None:
        metrics["horse_bird"] |= _recognised(classifier, data, labels)
    return metrics


def _recognised(classifier: Classifier, data: dict[str, torch.Tensor], labels: list[str | None]) -> dict:
    """Per held-out horse and bird: the fraction whose reconstruction (and original) it calls its label."""
    found = {}
    for label in ("horse", "bird"):
        mask = torch.tensor([value == label for value in labels])
        if mask.any():
            index = classifier.index(label)
            found[f"recon_{label}_as_{label}"] = (data["seen_recon"][mask] == index).float().mean().item()
            found[f"{label}_as_{label}"] = (data["seen"][mask] == index).float().mean().item()
    return found


def _summary(data: dict[str, torch.Tensor], keep: list[bool], dims: int) -> dict:
    mask = torch.tensor(keep)
    if not mask.any():
        return {"images": 0}
    recon, kl = data["recon"][mask].mean().item(), data["kl"][mask].mean().item()
    nelbo = recon + kl
    return {"images": int(mask.sum()), "neg_elbo_nats": nelbo, "recon_nats": recon, "kl_nats": kl,
            "bits_per_dim": nelbo / (dims * math.log(2)), "psnr_db": data["psnr"][mask].mean().item(),
            "active_units": int((data["mu"][mask].var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum()),
            "latent_dim": int(data["mu"].shape[1]), "active_unit_threshold": ACTIVE_UNIT_THRESHOLD}


def write_eval(metrics: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
