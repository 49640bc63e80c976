"""The shards' image format: plain PNGs, written and read without Pillow.

``prepare`` writes every image as a *plain* PNG: 8-bit RGB, not interlaced,
filter type None on every row, and the pixel rows in one IDAT chunk holding
an uncompressed ("stored") deflate stream. Any PNG reader opens it, and this
module reads a whole batch of them by slicing each one's pixel rows out
of its uncompressed deflate blocks and one NumPy reshape: a few microseconds a 32x32 image,
against about 100 us through Pillow and about 20 us just to inflate a
compressed one on the project's 2-core machine (``pegasus-dist bench``).
The price is size: tiny natural images compress losslessly by only ~25 %,
and in a tar shard, where every member is padded to 512 bytes, a 32x32
sample takes 5 KB instead of 4 KB.

Any other PNG (compressed, filtered, paletted, grey, 16-bit, interlaced, or
damaged) is decoded by Pillow, so shards from other tools or older versions
still load, and a damaged image gets an error naming it.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image

from pegasus_dist.errors import DataError

Bytes = bytes | memoryview  # shards hand out views into their bytes, not copies
SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RGB8 = (8, 2, 0, 0, 0)  # bit depth 8, colour type RGB, deflate, adaptive filtering, no interlace
_HEAD = 33  # signature (8) + IHDR chunk (4 length + 4 type + 13 data + 4 CRC)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> plain PNG bytes; the same pixels always give the same bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    height, width, _ = image.shape
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: filter type None
    rows[:, 1:] = image.reshape(height, 3 * width)
    return b"".join((_head(width, height), _chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)),
                     _chunk(b"IEND", b"")))


def decode_plain_batch(pngs: Sequence[Bytes], image_size: int) -> np.ndarray | None:
    """Plain square PNGs of ``image_size`` -> (B, H, W, 3) uint8, a read-only view.

    None when any of them is not a plain PNG of that size: decode those one by
    one with :func:`decode_image`, which handles every PNG and names a bad one.
    Chunk CRCs are not checked: zlib checks the pixel data's own checksum
    (Adler-32), and ``pegasus-dist verify`` checks every shard's sha256.
    """
    head, stride = _head(image_size, image_size), 1 + 3 * image_size
    try:
        raw = b"".join(_inflate(_idat(png, head)) for png in pngs)
    except (ValueError, IndexError, struct.error, zlib.error):
        return None
    if len(raw) != len(pngs) * image_size * stride:
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(len(pngs), image_size, stride)
    if rows[:, :, 0].any():  # filtered rows: Pillow undoes the filters
        return None
    return rows[:, :, 1:].reshape(len(pngs), image_size, image_size, 3)


def decode_images(pngs: Sequence[Bytes], image_size: int, wheres: Sequence[str]) -> np.ndarray:
    """PNGs -> (B, H, W, 3) uint8: in one pass when all are plain, else one by one.

    ``wheres`` name the samples; a bad one raises DataError naming it.
    """
    plain = decode_plain_batch(pngs, image_size)
    if plain is not None:
        return plain
    return np.stack([decode_image(png, image_size, where) for png, where in zip(pngs, wheres, strict=True)])


def decode_image(png: Bytes, image_size: int, where: str) -> np.ndarray:
    """PNG bytes -> a new (H, W, 3) uint8 array, checked against the expected size.

    ``where`` names the sample in errors.
    """
    plain = decode_plain_batch([png], image_size)
    if plain is not None:
        return plain[0].copy()
    try:
        with Image.open(io.BytesIO(png)) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: the image does not decode ({err}); "
                        "re-run `pegasus-dist prepare`") from None
    if array.shape != (image_size, image_size, 3):
        raise DataError(
            f"{where}: image is {array.shape[1]}x{array.shape[0]} but {image_size}x{image_size} "
            "was expected; prepare the shards at model.image_size or change model.image_size"
        )
    return array


@cache
def _head(width: int, height: int) -> bytes:
    """The signature and IHDR chunk: the same first 33 bytes for every plain PNG of a size."""
    return SIGNATURE + _chunk(b"IHDR", struct.pack(">II5B", width, height, *_RGB8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _inflate(stream: Bytes) -> Bytes:
    """The data of a zlib stream, checked against its Adler-32.

    A stream of stored blocks (what :func:`encode_png` writes) is sliced, not
    copied: in a loader worker, allocating a new buffer per image costs more
    than the copy itself. Compressed streams go through zlib.
    """
    if stream[0] & 0x0F != 8 or stream[1] & 0x20:  # not deflate, or a preset dictionary
        raise ValueError("not a plain zlib stream")
    blocks, position, final = [], 2, False
    while not final:
        header = stream[position]
        if header & 0b110:  # a compressed block
            return zlib.decompress(stream)
        length, complement = struct.unpack_from("<HH", stream, position + 1)
        if length ^ complement != 0xFFFF:
            raise ValueError("damaged stored block")
        blocks.append(stream[position + 5 : position + 5 + length])
        position += 5 + length
        final = header & 1
    data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
    if zlib.adler32(data) != int.from_bytes(stream[position : position + 4], "big"):
        raise ValueError("the pixel data fails its Adler-32 check")
    return data


def _idat(png: Bytes, head: bytes) -> Bytes:
    """The zlib stream of a plain PNG that starts with ``head`` and holds one IDAT chunk."""
    if png[:_HEAD] != head or png[_HEAD + 4 : _HEAD + 8] != b"IDAT":
        raise ValueError("not a plain PNG of this size")
    (length,) = struct.unpack_from(">I", png, _HEAD)
    return png[_HEAD + 8 : _HEAD + 8 + length]
