"""Image sources, read into memory at the target size, named by a spec string (:func:`load_source`):
``cifar10:PATH|download`` and ``stl10:PATH|download`` (:mod:`.official`), ``folder:PATH`` (a folder or
tar of ``[<split>/]<class>/*``, :mod:`.folders`) and ``synthetic:N[:SEED]`` (offline demos and tests).
README.md, "1. Shards", lists what each holds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pegasus_dist.data.folders import read_image_folder
from pegasus_dist.data.images import SourceImages
from pegasus_dist.data.official import download_official, read_cifar10, read_stl10
from pegasus_dist.errors import DataError


def load_source(spec: str, image_size: int = 32, verify_checksums: bool = True) -> SourceImages:
    """Read the source a spec names (the forms: the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind in ("cifar10", "stl10") and arg:
        path = download_official(kind, Path("data")) if arg == "download" else Path(arg)
        reader = read_cifar10 if kind == "cifar10" else read_stl10
        return reader(path, image_size, verify_checksums)
    if kind == "folder" and arg:
        return read_image_folder(arg, image_size)
    if kind == "synthetic" and re.fullmatch(r"\d+(:\d+)?", arg):
        count, _, seed = arg.partition(":")
        return synthetic(int(count), image_size, int(seed or 0))
    raise DataError(f"unknown source {spec!r}; use cifar10:PATH, cifar10:download, stl10:PATH, "
                    "stl10:download, folder:PATH or synthetic:N[:SEED]")


def synthetic(num_images: int, image_size: int = 32, seed: int = 0) -> SourceImages:
    """Deterministic toy images with class structure (horses on grass, birds on sky), for demos and tests."""
    if num_images < 1:
        raise DataError("synthetic:N needs N >= 1")
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["horse", "bird", "car", "ship", "cat", None], size=num_images,
                       p=[0.25, 0.25, 0.1, 0.1, 0.1, 0.2])
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    images = np.stack([_draw(kind, yy, xx, rng) for kind in kinds])
    labels = [None if k is None else str(k) for k in kinds]
    splits = ["unlabeled" if k is None else ("test" if rng.random() < 1 / 6 else "train")
              for k in labels]
    return SourceImages("synthetic", images, labels, splits,
                        f"synthetic(n={num_images}, size={image_size}, seed={seed})")


def _draw(kind: str | None, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    if kind == "horse":
        sky, ground = np.array([150, 190, 230]), np.array([70, 140, 60])
        canvas = np.where((yy > 0.7)[..., None], ground, sky).astype(float)
        coat = np.array([240, 240, 235]) if rng.random() < 0.4 else np.array([120, 70, 40])
        body = (np.abs(xx - cx) < 0.22) & (np.abs(yy - cy) < 0.1)
        legs = (yy > cy) & (yy < cy + 0.3) & (np.abs(((xx - cx + 0.2) * 10) % 2 - 1) > 0.6)
        legs &= np.abs(xx - cx) < 0.22
        head = (xx - cx - 0.25) ** 2 + (yy - cy + 0.12) ** 2 < 0.008
        canvas[body | legs | head] = coat
    elif kind == "bird":
        canvas = np.broadcast_to(np.array([120, 170, 235]), (*yy.shape, 3)).astype(float)
        colour = rng.uniform(30, 220, size=3)
        body = ((xx - cx) / 0.12) ** 2 + ((yy - cy) / 0.06) ** 2 < 1
        span = rng.uniform(0.15, 0.3)
        wings = (np.abs(xx - cx) < span) & (yy < cy) & (yy > cy - (span - np.abs(xx - cx)))
        canvas[body | wings] = colour
    elif kind is None:
        canvas = rng.uniform(0, 255, size=3) * (0.5 + 0.5 * xx[..., None])
    else:
        canvas = np.broadcast_to(rng.uniform(0, 120, size=3), (*yy.shape, 3)).astype(float)
        shape = (np.abs(xx - cx) < 0.3) & (np.abs(yy - cy) < (0.08 if kind != "cat" else 0.2))
        canvas[shape] = {"car": [200, 30, 30], "ship": [230, 230, 230], "cat": [200, 150, 60]}[kind]
    noise = rng.normal(0, 6, size=canvas.shape)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8)

