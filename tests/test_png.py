"""The shards' plain PNGs: exact round trips, any PNG reader agrees, and any PNG still loads."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from pegasus_dist.data.png import decode_image, decode_plain_batch, encode_png
from pegasus_dist.errors import DataError


def images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def pillow_png(image: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [16, 32, 96])
def test_plain_pngs_round_trip_alone_and_as_a_batch(size):
    originals = images(5, size)
    pngs = [encode_png(image) for image in originals]
    assert all(np.array_equal(decode_image(p, size, "x"), im) for p, im in zip(pngs, originals, strict=True))
    assert np.array_equal(decode_plain_batch(pngs, size), originals)
    assert [encode_png(image) for image in originals] == pngs  # deterministic bytes


def test_other_readers_see_the_same_pixels():
    image = images(1, 32)[0]
    with Image.open(io.BytesIO(encode_png(image))) as decoded:
        assert decoded.mode == "RGB" and np.array_equal(np.array(decoded), image)


def test_any_other_png_goes_through_pillow():
    image = images(1, 32, seed=1)[0]
    compressed = pillow_png(image, compress_level=9)  # filtered rows, inflating needed
    grey = pillow_png(image[:, :, 0])  # another colour type
    assert decode_plain_batch([encode_png(image), compressed], 32) is None
    assert np.array_equal(decode_image(compressed, 32, "x"), image)
    assert np.array_equal(decode_image(grey, 32, "x"), np.repeat(image[:, :, :1], 3, axis=2))


def test_a_plain_png_of_another_size_is_not_taken_for_one():
    small = encode_png(images(1, 16)[0])
    assert decode_plain_batch([small], 32) is None
    with pytest.raises(DataError, match="k: image is 16x16 but 32x32 was expected"):
        decode_image(small, 32, "k")


def test_damaged_pixels_are_caught_by_the_zlib_checksum():
    png = bytearray(encode_png(images(1, 32)[0]))
    png[200] ^= 0xFF  # inside the stored pixel rows
    with pytest.raises(zlib.error):
        zlib.decompress(bytes(png[41:-16]))  # the IDAT data: its Adler-32 no longer matches
    assert decode_plain_batch([bytes(png)], 32) is None
    with pytest.raises(DataError, match="shard.tar:k7: the image does not decode"):
        decode_image(bytes(png), 32, "shard.tar:k7")
