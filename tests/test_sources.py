"""Source readers on tiny fixtures written in the official formats, and on the real CIFAR-10 JPEGs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.fixtures import write_cifar10_archive
from pegasus_dist.data.folders import read_image_folder
from pegasus_dist.data.images import canonical_class
from pegasus_dist.data.official import read_cifar10, read_stl10
from pegasus_dist.data.sources import load_source, synthetic
from pegasus_dist.errors import DataError


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar_image(i: int) -> np.ndarray:
    """32x32x3 whose red channel is the column, green the row, blue the image number."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 0] = np.arange(32)[None, :]
    image[..., 1] = np.arange(32)[:, None]
    image[..., 2] = i
    return image


def write_cifar_archive(path: Path, per_batch: int = 2, batch_payload=None) -> None:
    """cifar-10-python.tar.gz as published: pickled dicts, channel-planar rows."""
    images = np.stack([cifar_image(i) for i in range(6 * per_batch)])
    write_cifar10_archive(images, [i % 10 for i in range(len(images))], path)
    if batch_payload is not None:  # replace every batch by a hostile pickle
        with tarfile.open(path, "w:gz") as tar:
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
                add_member(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch_payload, protocol=2))


def stl_bytes(images: list[np.ndarray]) -> bytes:
    """STL-10's *_X.bin: each image 3x96x96, column-major (so transposed per channel)."""
    return b"".join(im.transpose(2, 1, 0).tobytes() for im in images)


def stl_image(i: int) -> np.ndarray:
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    image[..., 0] = np.arange(96)[None, :]  # red = column
    image[..., 1] = np.arange(96)[:, None]  # green = row
    image[..., 2] = i
    return image


def write_stl_archive(path: Path) -> None:
    names = "airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "stl10_binary/class_names.txt", names.encode())
        add_member(tar, "stl10_binary/train_X.bin", stl_bytes([stl_image(0), stl_image(1)]))
        add_member(tar, "stl10_binary/train_y.bin", bytes([7, 2]))  # horse, bird
        add_member(tar, "stl10_binary/test_X.bin", stl_bytes([stl_image(2)]))
        add_member(tar, "stl10_binary/test_y.bin", bytes([3]))  # car
        add_member(tar, "stl10_binary/unlabeled_X.bin", stl_bytes([stl_image(3), stl_image(4)]))


def test_vocabulary_joins_the_datasets():
    assert canonical_class("automobile") == canonical_class("car") == "car"
    assert canonical_class("Horses") == "horse" and canonical_class("birds") == "bird"
    assert canonical_class("birds in flight") == "birds_in_flight"


def test_cifar10_pixels_labels_splits_and_order(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive)
    src = read_cifar10(archive, verify_checksum=False)
    assert src.images.shape == (12, 32, 32, 3) and src.images.dtype == np.uint8
    assert src.splits == ["train"] * 10 + ["test"] * 2
    for i in (0, 7, 11):
        assert np.array_equal(src.images[i], cifar_image(i))
    assert src.labels[:3] == ["airplane", "car", "bird"] and src.labels[7] == "horse"
    assert read_cifar10(archive, 64, verify_checksum=False).images.shape == (12, 64, 64, 3)


def test_cifar10_checksum_is_verified(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive)
    with pytest.raises(DataError) as err:
        read_cifar10(archive)
    digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
    assert str(err.value) == (
        f"{archive}: md5 {digest} differs from the official c58f30108f718f92721af3b95e74349a of "
        "cifar-10-python.tar.gz; pass --no-verify-checksums for a modified or fixture copy")


def test_a_pickled_object_in_the_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    archive = tmp_path / "evil.tar.gz"
    write_cifar_archive(archive, batch_payload={b"data": Exploit()})
    with pytest.raises(DataError, match="refused global (posix|os).system"):
        read_cifar10(archive, verify_checksum=False)
    assert not marker.exists()


def test_stl10_column_major_labels_and_antialiased_resize(tmp_path):
    archive = tmp_path / "stl10_binary.tar.gz"
    write_stl_archive(archive)
    native = read_stl10(archive, 96, verify_checksum=False)
    assert native.images.shape == (5, 96, 96, 3)
    assert np.array_equal(native.images[3], stl_image(3))
    assert native.labels == ["horse", "bird", "car", None, None]
    assert native.splits == ["train", "train", "test", "unlabeled", "unlabeled"]
    small = read_stl10(archive, 32, verify_checksum=False)
    # 96 -> 32 averages 3x3 blocks: the red ramp 0..95 becomes block means 1, 4, 7, ...
    assert small.images.shape == (5, 32, 32, 3)
    assert list(small.images[0, 0, :4, 0]) == [1, 4, 7, 10]


def write_folder(root: Path, layout: dict[str, list[tuple[int, int]]]) -> None:
    for folder, sizes in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (n * 40, 100, 200)).save(root / folder / f"{n:03d}.png")


def test_image_folder_with_splits_from_a_directory_and_a_tarball(tmp_path):
    root = tmp_path / "My Birds"
    write_folder(root, {"train/horses": [(64, 48), (20, 90)], "train/bird": [(32, 32)],
                        "test/bird": [(100, 100)]})
    src = read_image_folder(root)
    assert src.name == "folder_my_birds"
    assert src.images.shape == (4, 32, 32, 3)
    assert src.labels == ["bird", "horse", "horse", "bird"]
    assert src.splits == ["train", "train", "train", "test"]
    archive = tmp_path / "birds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="wrapped")
    from_tar = read_image_folder(archive)
    assert np.array_equal(from_tar.images, src.images) and from_tar.labels == src.labels


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_an_archive_read_in_one_pass_keeps_each_image_to_the_byte(tmp_path):
    """Images already at the size, in RGB, are taken as they are; a grey one is still made RGB; a
    member added to the archive twice (``tar -r``) is one image, the copy added last."""
    rgb, grey = cifar_image(7), np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        add_member(tar, "horse/a.png", _png(np.zeros_like(rgb)))
        add_member(tar, "horse/b.png", _png(grey))
    with tarfile.open(archive, "a") as tar:
        add_member(tar, "horse/a.png", _png(rgb))
    src = read_image_folder(archive)
    assert src.labels == ["horse", "horse"] and src.images.shape == (2, 32, 32, 3)
    assert np.array_equal(src.images[0], rgb)  # the later copy, pixel for pixel
    assert np.array_equal(src.images[1], np.repeat(grey[..., None], 3, axis=2))


def test_image_folder_without_splits_and_its_errors(tmp_path):
    write_folder(tmp_path / "imgs", {"horse": [(40, 40)]})
    assert read_image_folder(tmp_path / "imgs").splits == ["train"]
    (tmp_path / "imgs" / "horse" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png.*remove or replace"):
        read_image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images \(.png, .jpg, .jpeg, .jfif, .gif, .webp"):
        read_image_folder(tmp_path / "empty")


def test_synthetic_is_seeded_and_has_horses_and_birds():
    a, b, c = synthetic(300, seed=1), synthetic(300, seed=1), synthetic(300, seed=2)
    assert np.array_equal(a.images, b.images) and a.labels == b.labels
    assert not np.array_equal(a.images, c.images)
    assert a.labels.count("horse") > 45 and a.labels.count("bird") > 45
    pairs = zip(a.labels, a.splits, strict=True)
    assert all((label is None) == (split == "unlabeled") for label, split in pairs)


def test_source_specs(tmp_path):
    assert load_source("synthetic:10:3").origin == "synthetic(n=10, size=32, seed=3)"
    with pytest.raises(DataError, match="unknown source 'imagenet:x'"):
        load_source("imagenet:x")
    with pytest.raises(DataError, match="cifar10 archive not found: .*nope.tar.gz"):
        load_source(f"cifar10:{tmp_path}/nope.tar.gz")
    # the folder an archive was extracted into exists: "not found" would send the user looking
    with pytest.raises(DataError, match=r"stl10 archive .* is not a file \(a folder\?\); pass the "
                                        r"stl10_binary.tar.gz file itself"):
        load_source(f"stl10:{tmp_path}")


def test_a_file_that_is_no_archive_as_an_image_source_is_one_line(tmp_path):
    (text := tmp_path / "notes.txt").write_text("not images\n")
    with pytest.raises(DataError, match=r"notes.txt is not a readable tar archive \(.*gzip") as err:
        load_source(f"folder:{text}")
    assert "\n" not in str(err.value)  # tarfile's message lists each method it tried on a line


def _with_member(source: Path, out: Path, name: str, data: bytes | None) -> Path:
    """A copy of the tar.gz ``source`` with member ``name`` replaced by ``data`` (None: left out)."""
    with tarfile.open(source) as old, tarfile.open(out, "w:gz") as new:
        for member in old:
            if member.name != name:
                new.addfile(member, old.extractfile(member))
        if data is not None:
            add_member(new, name, data)
    return out


@pytest.mark.parametrize("name, data, says", [
    ("stl10_binary/train_y.bin", None, "has no stl10_binary/train_y.bin"),
    ("stl10_binary/train_y.bin", bytes([7]), "train_y.bin: 1 labels for 2 images"),
    ("stl10_binary/test_y.bin", bytes([11]), "test_y.bin: label 11 is outside 1..10"),
    ("stl10_binary/test_y.bin", bytes([0]), "test_y.bin: label 0 is outside 1..10"),
    ("stl10_binary/unlabeled_X.bin", b"\0" * 1000, "unlabeled_X.bin: 1,000 bytes are not whole 3x96x96"),
])
def test_a_damaged_stl10_member_is_refused_by_name(tmp_path, name, data, says):
    write_stl_archive(tmp_path / "stl10_binary.tar.gz")
    damaged = _with_member(tmp_path / "stl10_binary.tar.gz", tmp_path / "damaged.tar.gz", name, data)
    with pytest.raises(DataError, match=says):
        read_stl10(damaged, verify_checksum=False)


@pytest.mark.parametrize("batch, says", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [7]}, "1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [7, 10]}, "label 10 is outside 0..9"),
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [7, 2]}, "6,000 bytes are not whole 3x32x32"),
    ({b"labels": [7, 2]}, "has no data or labels"),
    ([1, 2], "refusing to load .a list, not a dict"),
])
def test_a_damaged_cifar10_batch_is_refused_by_name(tmp_path, batch, says):
    write_cifar_archive(tmp_path / "cifar.tar.gz")
    damaged = _with_member(tmp_path / "cifar.tar.gz", tmp_path / "damaged.tar.gz",
                           "cifar-10-batches-py/data_batch_3", pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=f"data_batch_3.*{says}"):
        read_cifar10(damaged, verify_checksum=False)
