"""`pegasus-dist contact-sheet`: candidate horses and birds to choose by eye.

The paper's author picked 8 horses and 21 birds by hand. This writes a
seeded random selection of labelled images as one PNG, each tile enlarged and
captioned with its shard key, plus a JSON listing the same keys, so that a
person can paste the keys they like into ``sampler.horse_keys`` and
``sampler.bird_keys``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.png import decode_image
from pegasus_dist.data.shards import iter_shard
from pegasus_dist.errors import DataError

CAPTION = 14  # pixels of caption strip under each tile
HEADER = 20  # pixels of title above each label's section


def contact_sheet(
    shard_set: str | Path, out: str | Path, labels: tuple[str, ...] = ("horse", "bird"),
    per_label: int = 32, columns: int = 8, tile: int = 128, seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out`` (PNG) and ``out`` with .json: the chosen keys by label, in tile order."""
    manifest = load_manifest(shard_set)
    keys_by_label: dict[str, list[str]] = {label: [] for label in labels}
    for path in manifest.shard_paths:
        for sample in iter_shard(path):
            if sample.meta.get("label") in keys_by_label:
                keys_by_label[sample.meta["label"]].append(sample.key)
    rng = np.random.default_rng(seed)
    chosen = {}
    for label, keys in keys_by_label.items():
        if not keys:
            raise DataError(f"{manifest.path} holds no {label} images; choose --label from "
                            f"{', '.join(sorted(manifest.counts.get('label', {})))}")
        picks = sorted(rng.choice(len(keys), size=min(per_label, len(keys)), replace=False))
        chosen[label] = [keys[i] for i in picks]
    images = _images(manifest.shard_paths, {k for ks in chosen.values() for k in ks},
                     manifest.image_size)
    sheet = _draw(chosen, images, columns, tile)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    listing = out.with_suffix(".json")
    listing.write_text(json.dumps({"shard_set": str(manifest.path), "columns": columns,
                                   "tile": tile, "keys": chosen}, indent=2) + "\n")
    return out, listing


def _images(paths: list[Path], keys: set[str], size: int) -> dict[str, np.ndarray]:
    return {s.key: decode_image(s.png, size, f"{p}:{s.key}")
            for p in paths for s in iter_shard(p) if s.key in keys}


def _draw(chosen: dict[str, list[str]], images: dict[str, np.ndarray], columns: int,
          tile: int) -> Image.Image:
    cell = tile + CAPTION
    rows = {label: -(-len(keys) // columns) for label, keys in chosen.items()}
    height = sum(HEADER + r * cell for r in rows.values())
    sheet = Image.new("RGB", (columns * tile, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    top = 0
    for label, keys in chosen.items():
        draw.text((4, top + 4), f"{label}: {len(keys)} candidates (sampler.{label}_keys)",
                  fill="black", font=font)
        top += HEADER
        for i, key in enumerate(keys):
            x, y = (i % columns) * tile, top + (i // columns) * cell
            sheet.paste(Image.fromarray(images[key]).resize((tile, tile), Image.Resampling.NEAREST),
                        (x, y))
            draw.text((x + 2, y + tile + 1), key, fill="black", font=font)
        top += rows[label] * cell
    return sheet
