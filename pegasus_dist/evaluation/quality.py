"""Whether a grid's tiles look like horses, birds, both, or a blur: scores from the project's classifier.

The scores and the crossfade baseline are defined in README.md, "Sample quality"; each grid is
scored from its saved PNG, what a person sees.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pegasus_dist.config import Config
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.errors import DataError
from pegasus_dist.evaluation.classifier import Classifier, labelled_images, predict
from pegasus_dist.evaluation.sampler import GRID_PADDING, load_images

log = logging.getLogger("pegasus_dist.evaluation.quality")

FILENAME = "quality.json"
REAL = ("horse", "bird")  # the held-out classes the Fréchet distance compares with
INTERPOLATIONS = ("pegasus", "lerp")  # grids of horse-bird pairs, with a crossfade baseline
OTHER_GRIDS = ("analogy", "prior")  # grids scored without a baseline


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of two sets of feature rows."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"a Fréchet distance needs at least 2 images per side, got {len(a)} and {len(b)}")
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    mean_gap = (a.mean(dim=0) - b.mean(dim=0)).pow(2).sum()
    return float(mean_gap + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def real_features(classifier: Classifier, shard_set: str | Path) -> torch.Tensor:
    """Penultimate features of the labelled horses and birds of ``shard_set`` (held-out: ``eval``)."""
    images, labels = labelled_images(shard_set, classifier.image_size)
    keep = [i for i, label in enumerate(labels) if label in REAL]
    if len(keep) < 2:
        raise DataError(f"{shard_set} holds {len(keep)} labelled horses and birds; the Fréchet "
                        "distance needs at least 2: prepare more data or a larger --eval-fraction")
    return predict(classifier, images[keep].float().div(255))[1]


def tile_scores(classifier: Classifier, tiles: torch.Tensor, real: torch.Tensor) -> dict:
    """The scores of ``tiles`` (README.md, "Sample quality"); ``real``: from :func:`real_features`."""
    probs, feats = predict(classifier, tiles)
    horse, bird = probs[:, classifier.index("horse")], probs[:, classifier.index("bird")]
    return {"tiles": len(tiles), "p_horse": horse.mean().item(), "p_bird": bird.mean().item(),
            "pegasus_score": (horse * bird).sqrt().mean().item(),
            "horse_bird_mass": (horse + bird).mean().item(), "frechet": frechet_distance(feats, real)}


REWRITE = "write the grids again with `pegasus-dist sample --checkpoint RUN`"


def read_grid(path: str | Path, tile_size: int, padding: int = GRID_PADDING) -> tuple[torch.Tensor, int]:
    """The tiles of a grid PNG, row-major (float N x 3 x T x T in [0, 1]), and its tiles per row;
    the all-black slots after the last tile of a partial last row are left out."""
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":  # the sampler writes RGB: grey or a palette is another picture
                raise ValueError(f"{image.mode} pixels, not the sampler's RGB")
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    except (OSError, ValueError) as err:  # a damaged PNG: PIL raises OSError or ValueError
        raise DataError(f"{path} is unreadable ({err}); {REWRITE}") from None
    step = tile_size + padding
    (rows, rest_h), (cols, rest_w) = (divmod(side - padding, step) for side in pixels.shape[1:])
    if rows < 1 or cols < 1 or rest_h or rest_w:
        raise DataError(f"{path} is not a grid of {tile_size}px tiles with {padding}px padding "
                        f"({pixels.shape[2]}x{pixels.shape[1]} px); was it written by the sampler?")
    tiles = torch.stack([pixels[:, padding + r * step : r * step + step, padding + c * step : c * step + step]
                         for r in range(rows) for c in range(cols)])
    filled = tiles.flatten(1).amax(dim=1) > 0
    count = int(filled.nonzero().max()) + 1 if filled.any() else 0
    return tiles[:count].float().div(255), cols


def crossfade(rows: list[dict], images: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1 - mu) * horse + mu * bird for each row's pair and mu, row-major, quantised as the PNGs are."""
    tiles = []
    for row in rows:
        horse, bird = (images[row[side]].float().div(255) for side in ("horse", "bird"))
        tiles += [(1 - mu) * horse + mu * bird for mu in row["mu"]]
    return torch.stack(tiles).mul(255).add(0.5).clamp(0, 255).floor().div(255)


def score_samples(samples: str | Path, classifier: Classifier, held_out: str | Path,
                  out: Path | None = None) -> dict:
    """Score every grid in the folder ``samples`` against the real horses and birds of ``held_out`` (the
    crossfade's from the grid JSON's ``shard_set``) into ``out`` (default: the folder's quality.json)."""
    samples = Path(samples)
    real = real_features(classifier, held_out)
    layouts = {name: _layout(samples / f"{name}.json", crossfaded=name in INTERPOLATIONS)
               for name in (*INTERPOLATIONS, "analogy") if (samples / f"{name}.json").exists()}
    layout = next(iter(layouts.values()), {})  # they agree on the tiles' size and padding
    size, padding = layout.get("tile_size", classifier.image_size), layout.get("padding", GRID_PADDING)
    grids: dict[str, dict] = {}
    for name in INTERPOLATIONS:
        if (samples / f"{name}.png").exists() and name in layouts:  # a folder there: unreadable
            tiles, _ = read_grid(samples / f"{name}.png", size, padding)
            baseline = crossfade(layouts[name]["rows"], _pair_images(layouts[name], size))
            grids[name] = {**tile_scores(classifier, tiles, real),
                           "crossfade": tile_scores(classifier, baseline, real)}
    if (samples / "reconstructions.png").exists():
        grids["reconstructions"] = _reconstruction_scores(
            classifier, *read_grid(samples / "reconstructions.png", size, padding), real)
    for name in OTHER_GRIDS:
        if (samples / f"{name}.png").exists():
            grids[name] = tile_scores(classifier, read_grid(samples / f"{name}.png", size, padding)[0], real)
    if not grids:
        raise DataError(f"{samples} holds no sampler grid (pegasus.png, reconstructions.png, ...); {REWRITE}")
    accuracy = classifier.meta.get("held_out", {}).get("accuracy")
    results = {"classifier": {"path": classifier.meta.get("path", ""), "held_out_accuracy": accuracy},
               "held_out": str(held_out), "real_images": len(real), "grids": grids}
    (out or samples / FILENAME).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _layout(path: Path, crossfaded: bool) -> dict:
    """A grid's JSON as the sampler writes it: a horse per row and, to be ``crossfaded``, its bird
    and mu; one line when damaged."""
    try:
        layout = json.loads(path.read_bytes())
        rows = layout["rows"]
        if all(isinstance(row["horse"], str) for row in rows) and (not crossfaded or all(
                isinstance(row["bird"], str) and all(isinstance(mu, float) for mu in row["mu"])
                for row in rows)):
            return layout
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}: {err}); {REWRITE}") from None
    raise DataError(f"{path} is not a grid layout of the sampler (rows of a horse, a bird and mu); {REWRITE}")


def _pair_images(layout: dict, size: int) -> dict[str, torch.Tensor]:
    shard_set = Path(layout.get("shard_set", ""))
    keys = {row[side] for row in layout["rows"] for side in ("horse", "bird")}
    found = load_images(ShardSet(shard_set, size), keys)
    if missing := sorted(keys - set(found)):
        raise DataError(f"{shard_set} lacks {', '.join(missing[:3])} of the grid's pairs; score with "
                        "the shards the grid was sampled from (data.shards)")
    return found


def _reconstruction_scores(classifier: Classifier, tiles: torch.Tensor, per_row: int,
                           real: torch.Tensor) -> dict:
    """Rows: horses, their reconstructions, birds, their reconstructions (sampler.reconstruction_grid)."""
    n, birds = per_row, (len(tiles) - 2 * per_row) // 2
    horses, horse_recon, bird_images, bird_recon = tiles.tensor_split([n, 2 * n, 2 * n + birds])

    def scores(prefix: str, horse_tiles: torch.Tensor, bird_tiles: torch.Tensor) -> dict:
        """The fractions of the horse and bird tiles read as their label, and their Fréchet distance."""
        read = {f"{prefix}{label}_as_{label}": (predict(classifier, part)[0].argmax(dim=1)
                                                == classifier.index(label)).float().mean().item()
                for label, part in (("horse", horse_tiles), ("bird", bird_tiles))}
        both = torch.cat([horse_tiles, bird_tiles])
        return read | {"frechet": frechet_distance(predict(classifier, both)[1], real)}

    return {"tiles": len(horse_recon) + len(bird_recon), **scores("recon_", horse_recon, bird_recon),
            "originals": scores("", horses, bird_images)}


def score_run_samples(cfg: Config, samples: str | Path, classifier: Classifier,
                      out: Path | None = None) -> dict:
    """:func:`score_samples` against the config's held-out set (``data.shards``/``eval.shard_set``)."""
    return score_samples(samples, classifier, Path(cfg.data.shards) / cfg.eval.shard_set, out)


def flatten(results: dict) -> dict[str, float]:
    """quality.json's numbers as {"<grid>/<metric>": v} and {"<grid>/crossfade/<metric>": v}, for W&B."""
    flat = {}

    def walk(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}/", value)
            elif isinstance(value, (int, float)):
                flat[f"{prefix}{key}"] = value

    walk("", results["grids"])
    return flat


def summary_line(results: dict) -> str:
    """One line on the Pegasus (or lerp) grid beside its crossfade, e.g. for the training log."""
    name = next((n for n in INTERPOLATIONS if n in results["grids"]), None)
    if name is None:
        return ", ".join(f"{grid}: Fréchet {values['frechet']:.1f}"
                         for grid, values in results["grids"].items())
    grid, base = results["grids"][name], results["grids"][name]["crossfade"]
    return (f"{name} grid: pegasus score {grid['pegasus_score']:.2f} "
            f"(crossfade {base['pegasus_score']:.2f}), "
            f"horse+bird mass {grid['horse_bird_mass']:.2f} ({base['horse_bird_mass']:.2f}), "
            f"Fréchet {grid['frechet']:.1f} ({base['frechet']:.1f})")
