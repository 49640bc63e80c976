"""Image sources, read into memory at the target size.

Sources are named by a spec string (``load_source``):

- ``cifar10:PATH`` / ``cifar10:download``: the official CIFAR-10 python archive
  (Krizhevsky, 2009), train (50,000) then test (10,000);
- ``stl10:PATH`` / ``stl10:download``: the official STL-10 binary archive
  (Coates et al., 2011), train (5,000), test (8,000), unlabeled (100,000);
- ``folder:PATH``: ``PATH/<class>/*.{png,jpg}`` or ``PATH/<split>/<class>/*``,
  a directory or a ``.tar``/``.tar.gz`` with that layout, images of any size;
- ``synthetic:N[:SEED]``: N generated images, for offline demos and tests.

Archives are read member by member and never extracted, so no archive can
write outside a folder; a member named outside it (``../x.jpg``, ``/x.jpg``) is
skipped with a warning. A truncated or damaged archive is an error naming it.
The CIFAR-10 batches are pickles: they are read with a
restricted unpickler that accepts only the NumPy array types they hold.
Class names map onto one vocabulary, so CIFAR's "automobile" and STL-10's
"car", and both datasets' horses and birds, land in the same class.
Folder images are checked against :data:`MAX_IMAGE_PIXELS` before decoding,
and 16-bit ones are scaled to 8 bits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import posixpath
import re
import tarfile
import unicodedata
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.sources")

VOCABULARY = ("airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "monkey",
              "ship", "truck")
SYNONYMS = {"automobile": "car", "aeroplane": "airplane", "plane": "airplane"}

CIFAR10 = {
    "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "filename": "cifar-10-python.tar.gz",
    "md5": "c58f30108f718f92721af3b95e74349a",
    "page": "https://www.cs.toronto.edu/~kriz/cifar.html",
}
STL10 = {
    "url": "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    "filename": "stl10_binary.tar.gz",
    "md5": "91f7769df0f17e558f3565bffb0c7dfb",
    "page": "https://cs.stanford.edu/~acoates/stl10/",
}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
# The 60,000 real CIFAR-10 JPEGs (folder layout) beside a clone of the repository
# (README, "First run on real data"): the bench and some tests use them when present.
REAL_CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test", "unlabeled")
STL_CHUNK = 1000  # images resized per step while streaming STL-10's 2.7 GB unlabeled file
# The largest folder image accepted, in pixels: above any camera photo in common use
# (24-45 megapixels), below Pillow's decompression-bomb warning (89 million). A bigger
# one takes over 150 MB to decode, only to be shrunk to a few dozen pixels a side.
MAX_IMAGE_PIXELS = 50_000_000
# Pillow's modes of 16-bit grey images ("I": how older Pillow versions open them).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


@dataclass(frozen=True)
class SourceImages:
    """One source in memory; an image's index in the source is its position here."""

    name: str  # key-safe: letters, digits and "_"
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: list[str | None]  # vocabulary class, None when unlabeled
    splits: list[str]  # the source's own split: train, test or unlabeled
    origin: str  # the file or folder read, or the synthetic recipe


def canonical_class(name: str) -> str:
    """A dataset's or folder's class name in the shared vocabulary.

    Unicode-normalised (NFKC) and lower-cased, runs of anything but letters and
    digits (of any script) made one "_", synonyms mapped ("automobile" -> "car")
    and a plural "s" dropped when that gives a vocabulary word ("horses" ->
    "horse"); any other name (e.g. "birds_in_flight", "馬") stays a class of its own.
    A name with no letter or digit at all gives "".
    """
    name = unicodedata.normalize("NFKC", name).strip().casefold()
    name = re.sub(r"[\W_]+", "_", name).strip("_")
    name = SYNONYMS.get(name, name)
    if name not in VOCABULARY and name.endswith("s") and name[:-1] in VOCABULARY:
        name = name[:-1]
    return name


def load_source(spec: str, image_size: int = 32, verify_checksums: bool = True) -> SourceImages:
    """Read the source a spec names (see the module docstring for the forms)."""
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
    raise DataError(
        f"unknown source {spec!r}; use cifar10:PATH, cifar10:download, stl10:PATH, "
        "stl10:download, folder:PATH or synthetic:N[:SEED]"
    )


def download_official(name: str, root: Path) -> Path:
    """Fetch an official archive through torchvision (md5 checked); needs the network."""
    from torchvision.datasets.utils import download_url

    meta = CIFAR10 if name == "cifar10" else STL10
    try:
        download_url(meta["url"], str(root), meta["filename"], meta["md5"])
    except Exception as err:  # urllib and torchvision raise many kinds
        raise DataError(
            f"could not download {meta['url']} ({err}); download {meta['filename']} from "
            f"{meta['page']} by hand and pass {name}:PATH"
        ) from None
    return root / meta["filename"]


# --- CIFAR-10 ---------------------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of bytes, lists and NumPy arrays), nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 (re-pickled copies)
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_cifar10(path: str | Path, image_size: int = 32, verify_checksum: bool = True) -> SourceImages:
    path = _existing(path, "cifar10", CIFAR10)
    if verify_checksum:
        _check_md5(path, CIFAR10)
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels, splits = [], [], []
    with _open_tar(path) as tar:
        # One forward pass: seeking back in a gzip stream decompresses it again from the start.
        raw = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()
               for m in tar if m.isfile() and m.name.rsplit("/", 1)[-1] in members}
    for member in members:
        if member not in raw:
            raise DataError(f"{path} has no cifar-10-batches-py/{member}: "
                            "not the CIFAR-10 python archive")
        batch = _unpickle(raw[member], f"{path}:{member}")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        images.append(data.transpose(0, 2, 3, 1))
        labels += [canonical_class(CIFAR_CLASSES[i]) for i in batch[b"labels"]]
        splits += ["test" if member == "test_batch" else "train"] * len(data)
    return SourceImages("cifar10", _resize_all(np.concatenate(images), image_size), labels,
                        splits, str(path.resolve()))


def write_cifar10_archive(images: np.ndarray, labels: list[int], path: Path) -> Path:
    """Write (N, 32, 32, 3) uint8 images in the official CIFAR-10 python layout.

    Five train batches and a test batch of about N/6 each, pickled as
    ``{b"data": N x 3072 channel-planar rows, b"labels": [...]}``, plus
    ``batches.meta``: what ``read_cifar10`` and torchvision's ``CIFAR10`` read.
    For fixtures and benchmarks; the md5 is of course not the official one.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    bounds = np.linspace(0, len(images), len(names) + 1).astype(int)
    with tarfile.open(path, "w:gz") as tar:
        for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
            rows = images[start:stop].transpose(0, 3, 1, 2).reshape(stop - start, -1)
            # str keys: what the official (Python 2) pickles load as with encoding="latin1"
            batch = {"batch_label": name, "labels": list(labels[start:stop]),
                     "data": np.ascontiguousarray(rows)}
            _add_member(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
        meta = {"label_names": list(CIFAR_CLASSES)}
        _add_member(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
    return path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _unpickle(raw: bytes, where: str) -> dict:
    """A batch dict with bytes keys, whether it was written by Python 2 (bytes) or 3 (str)."""
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{where}: refusing to load ({err}); "
                        "only the official CIFAR-10 batches are accepted") from None


# --- STL-10 -----------------------------------------------------------------


def read_stl10(path: str | Path, image_size: int = 32, verify_checksum: bool = True) -> SourceImages:
    path = _existing(path, "stl10", STL10)
    if verify_checksum:
        _check_md5(path, STL10)
    images, labels, splits = [], [], []
    # A .tar.gz cannot seek, so read members in archive order and keep the small
    # files; the order of the result is fixed below (train, test, unlabeled).
    parts: dict[str, object] = {}
    with _open_tar(path) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if name.endswith("_X.bin"):
                parts[name] = np.concatenate(list(_stl_images(tar.extractfile(member), image_size)))
            elif name.endswith("_y.bin") or name == "class_names.txt":
                parts[name] = tar.extractfile(member).read()
    if "class_names.txt" not in parts:
        raise DataError(f"{path} has no stl10_binary/class_names.txt: not the STL-10 binary archive")
    names = [canonical_class(n) for n in parts["class_names.txt"].decode().split()]
    for split in SPLITS:
        if f"{split}_X.bin" not in parts:
            raise DataError(f"{path} has no stl10_binary/{split}_X.bin")
        x = parts[f"{split}_X.bin"]
        images.append(x)
        if split == "unlabeled":
            labels += [None] * len(x)
        else:
            y = np.frombuffer(parts[f"{split}_y.bin"], dtype=np.uint8)
            labels += [names[i - 1] for i in y]  # STL-10 labels run from 1 to 10
        splits += [split] * len(x)
    return SourceImages("stl10", np.concatenate(images), labels, splits, str(path.resolve()))


def _stl_images(stream: io.BufferedReader, image_size: int) -> Iterator[np.ndarray]:
    """Chunks of images from an STL-10 ``*_X.bin``: column-major 3x96x96 uint8 each."""
    image_bytes = 3 * 96 * 96
    while chunk := stream.read(image_bytes * STL_CHUNK):
        x = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
        yield _resize_all(np.ascontiguousarray(x), image_size)


# --- image folders ----------------------------------------------------------


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
    name = "folder_" + (re.sub(r"[^A-Za-z0-9]+", "_", _stem(path)).strip("_").lower() or "images")
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
    with _open_tar(archive) as tar:
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
        with _open_tar(root) as tar:
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


# --- synthetic --------------------------------------------------------------


def synthetic(num_images: int, image_size: int = 32, seed: int = 0) -> SourceImages:
    """Deterministic toy images with class structure, for offline demos and tests.

    Horses are brown or white bodies on four legs over grass; birds are small
    bodies with two wing triangles on sky; other classes are plain shapes;
    about one image in five is unlabeled.
    """
    if num_images < 1:
        raise DataError("synthetic:N needs N >= 1")
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["horse", "bird", "car", "ship", "cat", None], size=num_images,
                       p=[0.25, 0.25, 0.1, 0.1, 0.1, 0.2])
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        images[i] = _draw(kind, yy, xx, rng)
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


# --- shared helpers ---------------------------------------------------------


def _existing(path: str | Path, name: str, meta: dict) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name} archive not found: {path}; download {meta['filename']} from "
                        f"{meta['page']} or use {name}:download")
    return path


def _check_md5(path: Path, meta: dict) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != meta["md5"]:
        raise DataError(
            f"{path}: md5 {digest.hexdigest()} differs from the official {meta['md5']} of "
            f"{meta['filename']}; pass --no-verify-checksums for a modified or fixture copy"
        )


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive, open for reading; a truncated or damaged one raises DataError naming it.

    The errors surface while members are read, not at opening: a gzip stream
    that ends early raises EOFError (which the command line would turn into a
    bare "Aborted."), a plain tar that ends early a ReadError.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except (EOFError, tarfile.TarError, zlib.error, OSError) as err:
        if isinstance(err, EOFError) or "unexpected end of data" in str(err):
            raise DataError(f"{path} is truncated ({err}); copy or download the whole file "
                            "again") from None
        raise DataError(f"{path} is not a readable tar archive ({err})") from None


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Resize square images with an antialiasing filter (the paper shrank STL-10 to 32x32).

    Shrinking uses BOX, which averages each output pixel's footprint exactly:
    for 96 -> 32 a clean 3x3 mean, with no aliasing and no ringing.
    """
    if images.shape[1] == size:
        return images
    # Upsampling (CIFAR-10 to 64 or 96) has nothing to alias: bicubic is smoother there.
    method = Image.Resampling.BOX if size < images.shape[1] else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), method))
                     for image in images])


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
