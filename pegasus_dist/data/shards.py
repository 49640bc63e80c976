"""WebDataset tar shards: deterministic writing and checked reading.

A sample is two tar members with one key: ``KEY.png`` (the RGB image) and
``KEY.json`` (``{"key", "source", "index", "label", "split"}``). Keys hold no
dots, since WebDataset splits a member name at its first dot. Writing goes
through ``webdataset.TarWriter`` with fixed owner and time stamps and PNGs of a
fixed compression level, so the same samples give byte-identical shards;
plain ``webdataset.WebDataset(urls)`` reads them.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pegasus_dist.errors import DataError

PNG_COMPRESS_LEVEL = 6  # zlib level: deterministic for a given Pillow/zlib


@dataclass
class ShardSample:
    key: str
    png: bytes
    meta: dict


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, the same bytes for the same pixels."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """Write (key, png bytes, meta) samples, in order, into one tar file."""
    with open(path, "wb") as stream:
        # An integer mtime: a float one makes tarfile add a PAX header to every member,
        # half as large again as the data of a 32x32 PNG.
        writer = wds.TarWriter(stream, user="pegasus", group="pegasus", mtime=0)
        for key, png, meta in samples:
            writer.write({"__key__": key, "png": png,
                          "json": json.dumps(meta, sort_keys=True).encode()})
        writer.close()


def iter_shard(path: Path) -> Iterator[ShardSample]:
    """The samples of one shard, in file order; a damaged tar raises DataError naming it."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                parts = pending.setdefault(key, {})
                parts[ext] = data
                if "png" in parts and "json" in parts:
                    del pending[key]
                    yield ShardSample(key, parts["png"], _parse_meta(parts["json"], path, key))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(
            f"shard {path} is unreadable ({err}); re-run `pegasus-dist prepare` to rewrite it"
        ) from None
    if pending:
        key = next(iter(pending))
        raise DataError(f"shard {path}: sample {key} lacks its png or json member; "
                        "re-run `pegasus-dist prepare`")


def decode_image(png: bytes, image_size: int, where: str) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8, checked against the expected size."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            array = np.array(image.convert("RGB"))  # a writable copy
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: the image does not decode ({err}); "
                        "re-run `pegasus-dist prepare`") from None
    if array.shape != (image_size, image_size, 3):
        raise DataError(
            f"{where}: image is {array.shape[1]}x{array.shape[0]} but {image_size}x{image_size} "
            "was expected; prepare the shards at model.image_size or change model.image_size"
        )
    return array


def _parse_meta(raw: bytes, path: Path, key: str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"shard {path}: {key}.json is not valid JSON") from None
    if not isinstance(meta, dict) or "label" not in meta:
        raise DataError(f"shard {path}: {key}.json has no label field; "
                        "re-run `pegasus-dist prepare`")
    return meta
