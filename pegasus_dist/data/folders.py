"""Image folders: ``PATH/<class>/*`` or ``PATH/<split>/<class>/*``, a directory or a tar archive read in
place. Images of any size are centre-cropped to a square, resized and converted to RGB (a GIF gives its
first frame). Files of other formats (HEIC, text) are named in one warning per source; oversized images
are refused before decoding."""

from __future__ import annotations

import io
import logging
import posixpath
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pegasus_dist.data.images import SPLITS, SourceImages, canonical_class, open_tar
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.data.folders")

# The raster formats read (all through Pillow); any other file is counted and named, never read.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".gif", ".webp", ".bmp", ".tif", ".tiff")
# Longer sides beyond this many times the shorter are refused: the square crop would keep a sliver
# of the image (a 1,000,000 x 1 strip keeps one pixel).
MAX_ASPECT = 10
# The largest folder image accepted, in pixels: above any camera photo in common use (24-45 megapixels),
# below Pillow's decompression-bomb warning (89 million). A bigger one takes over 150 MB to decode, only
# to be shrunk to a few dozen pixels a side.
MAX_IMAGE_PIXELS = 50_000_000
# Pillow's modes of 16-bit grey images ("I": how older Pillow versions open them).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def read_image_folder(path: str | Path, image_size: int = 32) -> SourceImages:
    """``root/<class>/*`` or ``root/<split>/<class>/*``, from a directory or a tar archive."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist; expected {path}/<class>/*.png|jpg "
                        "or a .tar.gz with that layout")
    every, read = _archive_files(path) if path.is_file() else _directory_files(path)
    files = sorted(f for f in every if _is_image(f))
    _warn_unread(path, sorted(set(every) - set(files)))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}; expected "
                        f"{path}/<class>/*.png|jpg or {path}/<train|test>/<class>/*")
    splits, labels, names = zip(*_classify(files, path), strict=True)
    images = np.stack([_load_image(data, where, image_size) for where, data in map(read, names)])
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", path.name)  # an archive's name without its suffix
    name = "folder_" + (re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_").lower() or "images")
    return SourceImages(name, images, list(labels), list(splits), str(path.resolve()))


def _warn_unread(root: Path, unread: list[str]) -> None:
    """One line naming the files of a source that are not images it reads, by suffix."""
    if not unread:
        return
    suffixes = Counter(Path(f).suffix.lower() or "(none)" for f in unread)
    kinds = ", ".join(f"{count} {suffix}" for suffix, count in suffixes.most_common())
    log.warning("%s: skipping %d file(s) that are not %s images (%s): %s", root, len(unread),
                "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES), kinds, _first(unread, 5))


def _first(names: list[str], shown: int) -> str:
    """The first ``shown`` of ``names``, and how many more there are."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# A folder's files, and how to read one of them by name: (where, bytes).
Files = tuple[list[str], Callable[[str], tuple[str, bytes]]]


def _directory_files(root: Path) -> Files:
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and not p.name.startswith(".")]
    return names, lambda name: (str(root / name), (root / name).read_bytes())


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _archive_files(archive: Path) -> Files:
    """The archive's files and the bytes of its images, read in one pass (a .tar.gz is
    decompressed once). Files named outside it (``../x.jpg``, ``/abs/x.jpg``) are skipped with
    one warning: they would also hide the top folder that wraps the real images."""
    names, contents = [], {}
    with open_tar(archive) as tar:
        for member in tar:
            if member.isfile() and not Path(member.name).name.startswith("."):
                names.append(member.name)
                if _is_image(member.name):
                    contents[member.name] = tar.extractfile(member).read()
    names = list(dict.fromkeys(names))  # a member added twice (tar -r) is read once: its last copy
    outside = [n for n in names if n.startswith("/") or ".." in n.split("/")]
    if outside:
        log.warning("%s: skipping %d member(s) named outside the archive's folder: %s",
                    archive, len(outside), _first(outside, 10))
    # Each image's bytes are dropped once it is read: decoded, it takes their place.
    return sorted(set(names) - set(outside)), lambda name: (f"{archive}:{name}", contents.pop(name))


def _classify(files: list[str], root: Path) -> list[tuple[str, str, str]]:
    """(split, class, file) for each file, in (split, class, name) order."""
    parts = [posixpath.normpath(f).split("/") for f in files]  # "./a//b" is "a/b"
    # An archive often wraps everything in one top folder (cifar10-jpg/...): skip it.
    while len({p[0] for p in parts}) == 1 and min(len(p) for p in parts) > 2:
        parts = [p[1:] for p in parts]
    has_splits = {p[0] for p in parts} <= set(SPLITS) and min(len(p) for p in parts) >= 3
    entries = []
    for file, p in zip(files, parts, strict=True):
        if not has_splits and len(p) < 2:
            raise DataError(f"{root}/{file} is not inside a class folder; "
                            f"expected {root}/<class>/*.png|jpg")
        split, cls = (p[0], p[1]) if has_splits else ("train", p[0])
        label = canonical_class(cls)
        if not label:
            raise DataError(f"{root}/{file}: the class folder {cls!r} has no letter or digit; "
                            "rename it after its class")
        entries.append((split, label, file))
    return sorted(entries, key=lambda e: (SPLITS.index(e[0]), e[1], e[2]))


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
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"image {where} is {w}x{h}, {too_big}")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise DataError(f"image {where} is {w}x{h}, longer than {MAX_ASPECT} times its width; "
                                "crop it by hand or remove it")
            if (w, h) == (size, size) and image.mode == "RGB":  # CIFAR-10's own: nothing to change
                return np.asarray(image)
            # Crop first, then resize: no intermediate is larger than the image itself.
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = _to_rgb(image).crop((left, top, left + side, top + side))
            return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
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
