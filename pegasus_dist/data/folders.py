"""Image folders: ``PATH/<class>/*`` or ``PATH/<split>/<class>/*``, a directory or a tar archive.

Images of any size are converted to RGB, resized on their shorter side and
centre-cropped. An archive is read in place, never extracted: a member named
outside it (``../x.jpg``) is skipped with a warning. Images over
:data:`MAX_IMAGE_PIXELS` are refused before decoding.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pegasus_dist.data.images import SPLITS, SourceImages, canonical_class, open_tar
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.data.folders")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The largest folder image accepted, in pixels: above any camera photo in common use
# (24-45 megapixels), below Pillow's decompression-bomb warning (89 million). A bigger
# one takes over 150 MB to decode, only to be shrunk to a few dozen pixels a side.
MAX_IMAGE_PIXELS = 50_000_000
# Pillow's modes of 16-bit grey images ("I": how older Pillow versions open them).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def read_image_folder(path: str | Path, image_size: int = 32) -> SourceImages:
    """``root/<class>/*`` or ``root/<split>/<class>/*``, from a directory or a tar archive."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist; expected {path}/<class>/*.png|jpg "
                        "or a .tar.gz with that layout")
    files = sorted(_archive_files(path) if path.is_file() else _directory_files(path))
    if not files:
        raise DataError(f"no .png/.jpg images under {path}; expected {path}/<class>/*.png|jpg "
                        f"or {path}/<train|test>/<class>/*")
    entries = _classify(files, path)
    images = np.stack([_load_image(data, where, image_size) for _, _, where, data in
                       _read_files(path, [e[2] for e in entries])])
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", path.name)  # an archive's name without its suffix
    name = "folder_" + (re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_").lower() or "images")
    return SourceImages(name, images, [e[1] for e in entries], [e[0] for e in entries],
                        str(path.resolve()))


def _directory_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _archive_files(archive: Path) -> list[str]:
    """The archive's image members, less those named outside it (skipped with one warning).

    A member such as ``../../x.jpg`` or ``/abs/x.jpg`` is never read: it would
    also hide the top folder that wraps the real images, and so their classes.
    """
    with open_tar(archive) as tar:
        names = [m.name for m in tar if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
    outside = [n for n in names if n.startswith("/") or ".." in n.split("/")]
    if outside:
        shown = ", ".join(outside[:10]) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
        log.warning("%s: skipping %d member(s) named outside the archive's folder: %s",
                    archive, len(outside), shown)
    return [n for n in names if n not in outside]


def _classify(files: list[str], root: Path) -> list[tuple[str, str, str]]:
    """(split, class, file) for each file, in (split, class, name) order."""
    parts = [posixpath.normpath(f).split("/") for f in files]  # "./a//b" is "a/b"
    # An archive often wraps everything in one top folder (cifar10-jpg/...): skip it.
    while len({p[0] for p in parts}) == 1 and min(len(p) for p in parts) > 2:
        parts = [p[1:] for p in parts]
    has_splits = {p[0] for p in parts} <= set(SPLITS) and min(len(p) for p in parts) >= 3
    entries = []
    for file, p in zip(files, parts, strict=True):
        if has_splits:
            split, cls = p[0], p[1]
        elif len(p) >= 2:
            split, cls = "train", p[0]
        else:
            raise DataError(f"{root}/{file} is not inside a class folder; "
                            f"expected {root}/<class>/*.png|jpg")
        label = canonical_class(cls)
        if not label:
            raise DataError(f"{root}/{file}: the class folder {cls!r} has no letter or digit; "
                            "rename it after its class")
        entries.append((split, label, file))
    return sorted(entries, key=lambda e: (SPLITS.index(e[0]), e[1], e[2]))


def _read_files(root: Path, wanted: list[str]) -> list[tuple[int, str, str, bytes]]:
    """(position, file, where, bytes) in the order of ``wanted``; one pass over an archive."""
    position = {f: i for i, f in enumerate(wanted)}
    found: list[tuple[int, str, str, bytes]] = []
    if root.is_dir():
        found = [(i, f, str(root / f), (root / f).read_bytes()) for f, i in position.items()]
    else:
        with open_tar(root) as tar:
            for member in tar:
                if member.name in position and member.isfile():
                    found.append((position[member.name], member.name, f"{root}:{member.name}",
                                  tar.extractfile(member).read()))
    return sorted(found)


def _load_image(data: bytes, where: str, size: int) -> np.ndarray:
    """Decode, convert to RGB, resize the shorter side to ``size``, centre-crop a square."""
    too_big = (f"over the limit of {MAX_IMAGE_PIXELS:,} pixels for a source image; "
               "shrink it (a few hundred pixels a side is plenty) or remove it")
    try:
        with warnings.catch_warnings():
            # Pillow warns of a decompression bomb from 89 million pixels; our own,
            # lower limit is checked below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {where} is {image.width}x{image.height}, {too_big}")
            image = _to_rgb(image)
            scale = size / min(image.size)
            if image.size != (size, size):
                w, h = (max(size, round(d * scale)) for d in image.size)
                image = image.resize((w, h), Image.Resampling.LANCZOS)
                left, top = (w - size) // 2, (h - size) // 2
                image = image.crop((left, top, left + size, top + size))
            return np.asarray(image)
    except Image.DecompressionBombError:  # over twice Pillow's limit: refused while opening
        raise DataError(f"image {where} is {too_big}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {where} ({err}); remove or replace the file") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; a 16-bit grey image keeps its high byte (Pillow's convert would clip it to white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
