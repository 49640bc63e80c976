"""What every image source gives (:class:`SourceImages`, in memory at the target size), and the steps
its readers share. Class names map onto one vocabulary: CIFAR's "automobile" is STL-10's "car"."""

from __future__ import annotations

import re
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pegasus_dist.errors import DataError

VOCABULARY = ("airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "monkey", "ship", "truck")
SYNONYMS = {"automobile": "car", "aeroplane": "airplane", "plane": "airplane"}
SPLITS = ("train", "test", "unlabeled")


@dataclass(frozen=True)
class SourceImages:
    """One source in memory; an image's index in the source is its position here."""

    name: str  # key-safe: letters, digits and "_"
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: list[str | None]  # vocabulary class, None when unlabeled
    splits: list[str]  # the source's own split: train, test or unlabeled
    origin: str  # the file or folder read, or the synthetic recipe


def canonical_class(name: str) -> str:
    """A dataset's or folder's class name in the shared vocabulary: a plural "s" is dropped
    when that gives a vocabulary word; any other name ("馬") is its own class."""
    name = unicodedata.normalize("NFKC", name).strip().casefold()
    name = re.sub(r"[\W_]+", "_", name).strip("_")
    name = SYNONYMS.get(name, name)
    if name not in VOCABULARY and name.endswith("s") and name[:-1] in VOCABULARY:
        name = name[:-1]
    return name


@contextmanager
def open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive, open for reading, never extracted; a truncated or damaged one raises DataError
    naming it (a gzip stream cut short raises EOFError, which the command line shows as "Aborted.")."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except (EOFError, tarfile.TarError, zlib.error, OSError) as err:
        if isinstance(err, EOFError) or "unexpected end of data" in str(err):
            raise DataError(f"{path} is truncated ({err}); copy or download the whole file again") from None
        reason = " ".join(str(err).split())  # tarfile names each compression it tried on a line
        raise DataError(f"{path} is not a readable tar archive ({reason})") from None


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Resize square images with an antialiasing filter (the paper shrank STL-10 to 32x32); shrinking
    uses BOX: for 96 -> 32 a clean 3x3 mean, with no aliasing and no ringing. Upsampling (CIFAR-10 to
    64 or 96) has nothing to alias: bicubic is smoother there."""
    if images.shape[1] == size:
        return images
    method = Image.Resampling.BOX if size < images.shape[1] else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), method))
                     for image in images])
