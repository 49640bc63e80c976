"""`pegasus-dist contact-sheet`: candidate horses and birds to choose by eye, as the paper's author picked by
hand. A seeded selection of labelled images as one PNG, each tile captioned with its whole shard key, and a
JSON of the keys for ``sampler.horse_keys`` and ``sampler.bird_keys``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pegasus_dist.errors import DataError

HEADER = 20  # pixels of title above each label's section
MARGIN = 2  # pixels around each caption, inside its tile's strip
BREAKS = ("-", "_", "")  # where captions break, in order of preference ("" = anywhere)
LABELS = ("horse", "bird")  # the classes the sampler picks from
PER_LABEL = 32
SEED = 0


def contact_sheet(shard_set: str | Path, out: str | Path, labels: tuple[str, ...] = LABELS,
                  per_label: int = PER_LABEL, columns: int = 8, tile: int = 128,
                  seed: int = SEED) -> tuple[Path, Path]:
    """Write ``out`` (PNG) and ``out`` with .json: the chosen keys by label, in tile order."""
    # Imported here: the shards' reader loads torch (3 s); the CLI reads this module's defaults for --help.
    from pegasus_dist.data.shards import ShardSet

    shards = ShardSet(shard_set)
    rng = np.random.default_rng(seed)
    chosen = {}
    for label, keys in shards.keys_by_label(labels).items():
        if not keys:
            raise DataError(f"{shards.path} holds no {label} images; choose --label from "
                            f"{', '.join(sorted(shards.manifest.counts.get('label', {})))}")
        picks = sorted(rng.choice(len(keys), size=min(per_label, len(keys)), replace=False))
        chosen[label] = [keys[i] for i in picks]
    images = shards.images({k for ks in chosen.values() for k in ks})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_sheet(chosen, images, columns, tile)[0].save(out)
    listing = out.with_suffix(".json")
    listing.write_text(json.dumps({"shard_set": str(shards.path), "columns": columns,
                                   "tile": tile, "keys": chosen}, indent=2) + "\n")
    return out, listing


@dataclass(frozen=True)
class Caption:
    """Where one tile's key is written: its lines, each line's top-left, and the strip under the tile."""
    key: str
    lines: list[str]
    origins: list[tuple[int, int]]
    strip: tuple[int, int, int, int]  # left, top, right, bottom (exclusive), as in PIL boxes


def caption_lines(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
                  breaks: tuple[str, ...] = BREAKS) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, which joined give it back: broken after a "-", else
    a "_", else anywhere, filled from the end so that the tail that tells keys apart (``train-0004013``)
    stays on one line."""
    sep, finer = breaks[0], breaks[1:]
    cut = re.escape(sep)
    pieces = re.findall(rf"[^{cut}]*{cut}|[^{cut}]+$", text) if sep else list(text)
    lines: list[str] = []
    for piece in reversed(pieces):
        if lines and font.getlength(piece + lines[0]) <= width:
            lines[0] = piece + lines[0]
        elif font.getlength(piece) <= width or not finer:
            lines.insert(0, piece)
        else:
            lines[:0] = caption_lines(piece, font, width, finer)
    return lines


def draw_sheet(chosen: dict[str, list[str]], images: dict[str, np.ndarray], columns: int,
               tile: int) -> tuple[Image.Image, list[Caption]]:
    """The sheet: per label a title, then its tiles in rows, each over its caption strip (as tall as the
    longest key needs, so every caption fits under its own tile)."""
    font = ImageFont.load_default()
    lines = {key: caption_lines(key, font, tile - 2 * MARGIN) for keys in chosen.values() for key in keys}
    line_height = font.getbbox("Ag_|")[3] + 1
    cell = tile + max(map(len, lines.values()), default=1) * line_height + 2 * MARGIN
    rows = {label: -(-len(keys) // columns) for label, keys in chosen.items()}
    sheet = Image.new("RGB", (columns * tile, sum(HEADER + r * cell for r in rows.values())), "white")
    draw = ImageDraw.Draw(sheet)
    captions, top = [], 0
    for label, keys in chosen.items():
        draw.text((4, top + 4), f"{label}: {len(keys)} candidates (sampler.{label}_keys)",
                  fill="black", font=font)
        top += HEADER
        for i, key in enumerate(keys):
            x, y = (i % columns) * tile, top + (i // columns) * cell
            sheet.paste(Image.fromarray(images[key]).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            origins = [(x + MARGIN, y + tile + MARGIN + j * line_height) for j in range(len(lines[key]))]
            for origin, line in zip(origins, lines[key], strict=True):
                draw.text(origin, line, fill="black", font=font)
            captions.append(Caption(key, lines[key], origins, (x, y + tile, x + tile, y + cell)))
        top += rows[label] * cell
    return sheet, captions
