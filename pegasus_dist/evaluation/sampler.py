"""The paper's Pegasus sampler (Section 1.4) and the grids written after each phase: 8 horses and 21 birds
(seeded, or ``sampler.pick=confident``), each horse paired with a random bird, slerp between their latent
means at 8 mu in [0.4, 0.7], decoded: an 8x8 grid, a row per horse; beside it the reconstructions and the
prior. ``--method`` adds lerp and the analogy (wing vector) sampler (README.md, "Beyond the paper")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pegasus_dist.config import Config, SamplerConfig, load_config
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation.classifier import Classifier, find_classifier, predict
from pegasus_dist.model.saved import load_model_weights, resolve_checkpoint, sampled_weights
from pegasus_dist.model.slerp import slerp
from pegasus_dist.model.vae import VAE

GRID_PADDING = 2  # pixels between tiles, as torchvision's make_grid draws them
PRIOR_SAMPLES = 64  # the prior grid: 8 rows of 8


@dataclass
class LabelledImages:
    keys: list[str]
    images: torch.Tensor  # uint8 (N, 3, H, W)


@dataclass
class CheckpointSamples:
    """What `pegasus-dist sample` wrote, and with which config and classifier (None: none exists)."""
    cfg: Config
    folder: Path
    paths: dict[str, Path]
    classifier: Classifier | None


@dataclass
class SampleOutputs:
    """What one sampler run wrote, by name: pegasus, reconstructions, prior."""
    paths: dict[str, Path]
    captions: dict[str, str]  # what each grid's rows and columns show, for W&B


def pick_horses_and_birds(cfg: SamplerConfig, shards_root: str | Path, image_size: int,
                          model: VAE | None = None, classifier: Classifier | None = None,
                          ) -> tuple[LabelledImages, LabelledImages]:
    """The configured keys, or a seeded choice of labelled horses and birds (``cfg.pick``: with
    ``confident``, those :func:`confident_keys` ranks by ``model`` and ``classifier``)."""
    if cfg.pick == "confident" and (model is None or classifier is None):
        raise ConfigError("sampler.pick=confident needs the quality classifier; create it with "
                          "`pegasus-dist classifier --config CONFIG` or set sampler.pick=random")
    shard_set = ShardSet(Path(shards_root) / cfg.shard_set, image_size)
    by_label = shard_set.keys_by_label(("horse", "bird"))
    rng = np.random.default_rng(cfg.seed)
    chosen = {}
    for label, keys, count in (("horse", cfg.horse_keys, cfg.num_horses),
                               ("bird", cfg.bird_keys, cfg.num_birds)):
        available = by_label[label]
        if keys:
            if missing := sorted(set(keys) - set(available)):
                raise DataError(f"sampler.{label}_keys: {', '.join(missing[:3])} not found among the "
                                f"{label}s of {shard_set.path}; use keys from `pegasus-dist contact-sheet`")
            chosen[label] = list(keys)
        elif len(available) < count:
            raise DataError(f"{shard_set.path} holds {len(available)} labelled {label} images but the "
                            f"sampler needs {count}; prepare more data or lower sampler.num_{label}s")
        elif cfg.pick == "confident":
            pool = [available[i] for i in sorted(rng.choice(
                len(available), size=max(count, min(cfg.pick_pool, len(available))), replace=False))]
            chosen[label] = confident_keys(model, classifier, label, pool, count,
                                           load_images(shard_set, set(pool)))
        else:
            chosen[label] = [available[i] for i in rng.choice(len(available), size=count, replace=False)]
    images = load_images(shard_set, {*chosen["horse"], *chosen["bird"]})
    horses, birds = (LabelledImages(keys, torch.stack([images[k] for k in keys])) for keys in chosen.values())
    return horses, birds


@torch.no_grad()
def confident_keys(model: VAE, classifier: Classifier, label: str, pool: list[str], count: int,
                   images: dict[str, torch.Tensor]) -> list[str]:
    """The ``count`` keys of ``pool`` whose reconstructions most surely classify as ``label``, best first."""
    x = _to_float(torch.stack([images[key] for key in pool]), model)
    reconstructions = torch.cat([model.decode(model.encode(chunk)[0]).float().cpu()
                                 for chunk in x.split(256)])
    probability = predict(classifier, reconstructions)[0][:, classifier.index(label)]
    best = torch.argsort(probability, descending=True, stable=True)[:count]
    return [pool[i] for i in best.tolist()]


def load_images(shard_set: ShardSet, keys: set[str]) -> dict[str, torch.Tensor]:
    """The images (uint8 3 x H x W) of ``keys`` found in ``shard_set``, by key."""
    return {key: _chw(image) for key, image in shard_set.images(keys).items()}


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


@torch.no_grad()
def pegasus_grid(model: VAE, horses: LabelledImages, birds: LabelledImages, cfg: SamplerConfig,
                 method: str = "slerp") -> tuple[torch.Tensor, list[dict]]:
    """(num_horses * num_mu) decoded interpolations, row-major, and each row's horse and bird."""
    rng = np.random.default_rng(cfg.seed + 1)  # the pairing draw is independent of the pick
    partners = rng.integers(0, len(birds.keys), size=len(horses.keys))
    mu_h, mu_b = (model.encode(_to_float(chosen.images, model))[0] for chosen in (horses, birds))
    mus = torch.linspace(cfg.mu_start, cfg.mu_end, cfg.num_mu, device=mu_h.device)
    q1, q2, t = mu_h[:, None, :], mu_b[partners][:, None, :], mus[None, :, None]
    z = slerp(q1, q2, t) if method == "slerp" else torch.lerp(q1, q2, t)
    rows = [{"row": i, "horse": horses.keys[i], "bird": birds.keys[j], "mu": mus.tolist()}
            for i, j in enumerate(partners.tolist())]
    return model.decode(z.flatten(0, 1)).float().cpu(), rows


@torch.no_grad()
def reconstruction_grid(model: VAE, horses: LabelledImages, birds: LabelledImages) -> torch.Tensor:
    """Rows: the horses, their reconstructions, birds, their reconstructions."""
    rows = []
    for images in (horses.images, birds.images[: len(horses.keys)]):
        x = _to_float(images, model)
        rows += [x, model.decode(model.encode(x)[0])]
    return torch.cat(rows).float().cpu()


@torch.no_grad()
def prior_grid(model: VAE, seed: int) -> tuple[torch.Tensor, int]:
    """PRIOR_SAMPLES decodes of z ~ N(0, I), and the grid's tiles per row."""
    z = torch.randn(PRIOR_SAMPLES, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    return model.decode(z.to(next(model.parameters()).device)).float().cpu(), 8


@torch.no_grad()
def attribute_vector(model: VAE, cfg: SamplerConfig, shards_root: str | Path) -> torch.Tensor:
    """The wing vector: mean latent of the chosen images (or birds) minus that of other classes."""
    shard_set = ShardSet(Path(shards_root) / cfg.attribute_shard_set, model.image_size)
    chosen = set(cfg.attribute_keys)
    sides: dict[str, list[torch.Tensor]] = {"with": [], "without": []}
    for sample in shard_set:
        label = sample.meta.get("label")
        side = ("with" if (sample.key in chosen if chosen else label == "bird")
                else "without" if label not in (None, "bird") else None)
        if side and len(sides[side]) < cfg.attribute_samples:
            sides[side].append(_chw(shard_set.decode(sample)))
    for side, what in (("with", "the sampler.attribute_keys images or birds"),
                       ("without", "labelled images of other classes")):
        if not sides[side]:
            raise DataError(f"{shard_set.path} holds no {what}; the analogy sampler needs both")
    means = [torch.cat([model.encode(_to_float(chunk, model))[0] for chunk in
                        torch.stack(sides[side]).split(256)]).mean(dim=0) for side in ("with", "without")]
    return means[0] - means[1]


@torch.no_grad()
def analogy_grid(model: VAE, horses: LabelledImages, vector: torch.Tensor,
                 cfg: SamplerConfig) -> tuple[torch.Tensor, list[dict]]:
    """Each row: one horse's latent mean plus 0 .. strength_max times the vector."""
    mu_h, _ = model.encode(_to_float(horses.images, model))
    strengths = torch.linspace(0, cfg.strength_max, cfg.num_mu, device=mu_h.device)
    z = mu_h[:, None, :] + strengths[None, :, None] * vector.to(mu_h.device)
    rows = [{"row": i, "horse": key, "strength": strengths.tolist()} for i, key in enumerate(horses.keys)]
    return model.decode(z.flatten(0, 1)).float().cpu(), rows


def run_sampler(model: VAE, cfg: SamplerConfig, shards_root: str | Path, out_dir: str | Path,
                method: str = "slerp", classifier: Classifier | None = None) -> SampleOutputs:
    """Write the grids of ``method`` into ``out_dir``; ``sampler.pick=confident`` needs ``classifier``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()  # batch norm uses its running statistics, as at inference
    try:
        images, layout = _method_grids(model, cfg, shards_root, method, classifier)
    finally:
        model.train(was_training)
    # Imported here: torchvision's import brings torch._dynamo, 1.5 s of every rank's start-up on 2 cores.
    from torchvision.utils import save_image

    paths = {name: out_dir / f"{name}.png" for name in images}
    for name, (batch, per_row) in images.items():
        save_image(batch, paths[name], nrow=per_row, padding=GRID_PADDING)
    if layout:
        layout = {"method": method, "pick": cfg.pick, "tile_size": model.image_size, "padding": GRID_PADDING,
                  "columns": cfg.num_mu, **layout}
        name = "pegasus" if method == "slerp" else method
        (out_dir / f"{name}.json").write_text(json.dumps(layout, indent=2) + "\n")
    return SampleOutputs(paths, captions={name: grid_caption(name, layout, cfg) for name in paths})


def grid_caption(name: str, layout: dict, cfg: SamplerConfig) -> str:
    """One line that says what the rows and columns of grid ``name`` show."""
    rows = layout.get("rows", [])
    if name in ("pegasus", "lerp"):
        how = "slerp" if name == "pegasus" else "lerp"
        mus = ", ".join(f"{mu:.2f}" for mu in rows[0]["mu"])
        pairs = "; ".join(f"row {r['row'] + 1}: horse {r['horse']}, bird {r['bird']}" for r in rows)
        return f"{how} from each row's horse (mu=0) to its bird (mu=1), columns mu = {mus}; {pairs}"
    if name == "analogy":
        strengths = ", ".join(f"{s:.2f}" for s in rows[0]["strength"])
        horses = "; ".join(f"row {r['row'] + 1}: horse {r['horse']}" for r in rows)
        return f"each row's horse plus the wing vector times {strengths}; {horses}"
    if name == "reconstructions":
        n = cfg.num_horses
        return (f"row 1: {n} horses, row 2: their reconstructions, row 3: {min(n, cfg.num_birds)} "
                "birds, row 4: their reconstructions (decoded latent means)")
    return f"{PRIOR_SAMPLES} samples of the prior: decoded z ~ N(0, I), seed {cfg.seed}"


def _method_grids(model: VAE, cfg: SamplerConfig, shards_root: str | Path, method: str,
                  classifier: Classifier | None) -> tuple[dict[str, tuple[torch.Tensor, int]], dict]:
    """{name: (images, per row)} and the JSON layout for one sampling method."""
    if method == "prior":
        return {"prior": prior_grid(model, cfg.seed)}, {}
    horses, birds = pick_horses_and_birds(cfg, shards_root, model.image_size, model, classifier)
    shard_set = str(Path(shards_root) / cfg.shard_set)
    if method == "analogy":
        vector = attribute_vector(model, cfg, shards_root)
        images, rows = analogy_grid(model, horses, vector, cfg)
        about = {"from": cfg.attribute_keys or "birds", "minus": "other labelled classes",
                 "norm": vector.norm().item()}
        return {"analogy": (images, cfg.num_mu)}, {"rows": rows, "vector": about, "shard_set": shard_set}
    images, rows = pegasus_grid(model, horses, birds, cfg, method)
    layout = {"rows": rows, "shard_set": shard_set}
    if method == "lerp":
        return {"lerp": (images, cfg.num_mu)}, layout
    return {"pegasus": (images, cfg.num_mu),
            "reconstructions": (reconstruction_grid(model, horses, birds), len(horses.keys)),
            "prior": prior_grid(model, cfg.seed)}, layout


def _to_float(images: torch.Tensor, model: VAE) -> torch.Tensor:
    """uint8 images as the model's input: floats in [0, 1] on its device."""
    return images.to(next(model.parameters()).device).float().div_(255)


def sample_checkpoint(checkpoint: str | Path, overrides: list[str],
                      out_dir: str | Path | None = None) -> CheckpointSamples:
    """``pegasus-dist sample``: rebuild the model from a checkpoint's config and sample."""
    cfg, model, folder = load_trained_model(checkpoint, overrides)
    out = Path(out_dir) if out_dir else folder.parent.parent / "samples" / folder.name
    classifier = find_classifier(cfg)
    outputs = run_sampler(model, cfg.sampler, cfg.data.shards, out, cfg.sampler.method, classifier)
    return CheckpointSamples(cfg, out, outputs.paths, classifier)


def load_trained_model(checkpoint: str | Path, overrides: list[str]) -> tuple[Config, VAE, Path]:
    """(config, model on its device, checkpoint folder) from a checkpoint or run folder."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config(folder / "config.yaml", overrides)
    model = VAE(cfg.model)
    load_model_weights(model, folder, sampled_weights(folder))
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    return cfg, model.to(device), folder
