"""WebDataset tar shards: written by webdataset, read through one :class:`ShardSet`. A sample is ``KEY.npy``
(the (H, W, 3) uint8 image) and ``KEY.json`` (``{"key", "source", "index", "label", "split"}``); keys hold no
dots, since WebDataset splits a member name at its first dot. Why ``.npy`` and not PNG (still read):
docs/performance.md ("Sample format")."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import numpy as np
from webdataset.autodecode import imagehandler, npy_loads
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.writer import TarWriter

from pegasus_dist.data.decoded import Decoded, built_decoded, open_decoded
from pegasus_dist.data.manifest import REPREPARE, Manifest, changed_shard, load_manifest
from pegasus_dist.errors import DataError

_PNG = imagehandler("rgb8")  # Pillow, to RGB
# webdataset's decoders of what prepare writes, and of what shards before it held. Called directly:
# its Decoder tries a chain of handlers per member, which triples the cost of a 32 px image.
_DECODERS = {"npy": npy_loads, "png": lambda data: _PNG(".png", data)}
IMAGE_EXTENSIONS = tuple(_DECODERS)


@dataclass
class ShardSample:
    key: str
    image: bytes  # the encoded image member
    image_ext: str  # its extension, one of IMAGE_EXTENSIONS: how to decode it
    raw_meta: bytes  # the JSON member, parsed on first use of ``meta``
    shard: Path

    @cached_property
    def meta(self) -> dict:
        """The sample's JSON; a sample without a label raises DataError naming it."""
        try:
            meta = json.loads(self.raw_meta)
        except ValueError:
            raise DataError(f"shard {self.shard}: {self.key}.json is not valid JSON") from None
        if not isinstance(meta, dict) or "label" not in meta:
            raise DataError(f"shard {self.shard}: {self.key}.json has no label field; {REPREPARE}")
        return meta


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray, dict]]) -> None:
    """Write (key, (H, W, 3) uint8 image, meta) samples, in order, into one tar file; every member's
    owner, mode and time stamp are fixed, so the same samples give the same bytes."""
    with TarWriter(str(path), user="pegasus", group="pegasus", mode=0o444, mtime=0) as writer:
        for key, image, meta in samples:
            writer.write({"__key__": key, "npy": image, "json": meta})


def iter_shard(path: Path, sha256: str | None = None) -> Iterator[ShardSample]:
    """The samples of one shard, in file order; a damaged tar raises DataError after those before it.
    With ``sha256`` (its manifest's), the file is hashed as it is read, and one that differs raises
    DataError after its last sample: any byte changed since ``prepare`` is found."""
    try:
        with open(path, "rb") as f:
            stream = _Hashed(f)
            members = tar_file_expander([{"url": str(path), "stream": stream}])
            yield from (_shard_sample(sample, path) for sample in group_by_keys(members))
            while stream.read(1 << 20):  # the end-of-archive blocks, which tarfile leaves unread
                pass
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        # webdataset appends the stream and URL to the message: keep the reason alone. An OSError's
        # first argument is its errno: say its words instead ("No such file or directory").
        reason = (err.strerror if isinstance(err, OSError) and err.strerror
                  else str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__)
        raise DataError(f"shard {path} is unreadable ({reason}); {REPREPARE} to rewrite it") from None
    if sha256 is not None and stream.digest.hexdigest() != sha256:
        raise DataError(changed_shard(path))


class _Hashed:
    """A binary file read through a sha256 (tarfile's stream mode only calls ``read``)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data


def _shard_sample(sample: dict, path: Path) -> ShardSample:
    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "json" not in sample:
        raise DataError(f"shard {path}: sample {key} lacks its image ({' or '.join(IMAGE_EXTENSIONS)}) "
                        f"or json member; {REPREPARE}")
    return ShardSample(key, sample[ext], ext, sample["json"], path)


class ShardSet:
    """A shard set: its manifest, its samples shard by shard, and their images, checked."""

    def __init__(self, folder: str | Path, image_size: int | None = None) -> None:
        """``image_size``: what the reader expects (model.image_size); None takes the manifest's."""
        self.manifest: Manifest = load_manifest(folder)
        self.path, self.image_size = self.manifest.path, self.manifest.image_size
        if image_size is not None and image_size != self.image_size:
            raise DataError(f"{self.path} holds {self.image_size}px images but model.image_size is "
                            f"{image_size}; set model.image_size={self.image_size} or prepare shards with "
                            f"--image-size {image_size}")

    def __iter__(self) -> Iterator[ShardSample]:
        """Every sample, shard after shard, in file order."""
        for index in range(len(self.manifest.shards)):
            yield from self.read(index)

    def read(self, index: int, hashed: bool = True) -> Iterator[ShardSample]:
        """The samples of shard ``index``; then DataError if they are not as many as the manifest says (a
        tar cut short between members fails its sha256; the count, a manifest that disagrees).
        ``hashed=False``: the caller checked the file's sha256 already; it is not hashed again."""
        entry, path = self.manifest.shards[index], self.manifest.shard_paths[index]
        count = 0
        for sample in iter_shard(path, entry.sha256 if hashed else None):
            count += 1
            yield sample
        if count != entry.num_samples:
            raise DataError(f"shard {path} holds {count} samples but its manifest says {entry.num_samples}; "
                            f"{REPREPARE}")

    def decode(self, sample: ShardSample) -> np.ndarray:
        """The sample's (H, W, 3) uint8 image, checked against the set's image size."""
        where = f"{sample.shard}:{sample.key}"
        try:
            image = _DECODERS[sample.image_ext](sample.image)
        except Exception as err:  # Pillow and NumPy raise many kinds for a damaged member
            raise DataError(f"{where}: the image does not decode ({err}); {REPREPARE}") from None
        size = self.image_size
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape[2:] != (3,):
            raise DataError(f"{where}: the image is not an (H, W, 3) uint8 array; {REPREPARE}")
        if image.shape[:2] != (size, size):
            raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]} but {size}x{size} "
                            "was expected; prepare the shards at model.image_size or change model.image_size")
        return np.require(image, requirements="W")  # .npy members decode to read-only views

    def decoded(self) -> Decoded | None:
        """The set as one verified mapped array (:mod:`.decoded`); None where it cannot be written."""
        return open_decoded(self.manifest, self.decode_all)

    def decode_all(self) -> Decoded:
        """Every image, key and label, decoded from the tars into memory."""
        size = self.image_size
        images = np.empty((self.manifest.num_samples, size, size, 3), dtype=np.uint8)
        keys, labels = [], []
        for row, sample in enumerate(self):  # read() checks each shard's count
            images[row] = self.decode(sample)
            keys.append(sample.key)
            labels.append(sample.meta["label"])
        return Decoded(images, keys, labels)

    def keys_by_label(self, labels: Iterable[str]) -> dict[str, list[str]]:
        """The keys of each of ``labels``, in file order."""
        found: dict[str, list[str]] = {label: [] for label in labels}
        pairs = (zip(self._built.keys, self._built.labels, strict=True) if self._built is not None
                 else ((s.key, s.meta["label"]) for s in self))
        for key, label in pairs:
            if label in found:
                found[label].append(key)
        return found

    def images(self, keys: Collection[str]) -> dict[str, np.ndarray]:
        """The (H, W, 3) uint8 images of ``keys`` found in the set, by key."""
        if (built := self._built) is None:
            return {s.key: self.decode(s) for s in self if s.key in keys}
        return {key: np.array(built.images[row]) for row, key in enumerate(built.keys) if key in keys}

    @cached_property
    def _built(self) -> Decoded | None:
        """The decoded array a training run built, when it verifies: a lookup there costs a hash of the
        files, where a scan of the tars parses every member (seconds for a finetune's set)."""
        return built_decoded(self.manifest)
