"""The decoded fast path: a shard set's images as one memory-mapped uint8 array beside its tars. The
tars stay the truth: ``decoded.json`` records the sha256 of every shard it was decoded from and one over
pixels, keys and labels; a stale or damaged pair is rebuilt on first use, under a lock (concurrent ranks
build once). One array per set: the memory loader maps the file as its CPU tensor, with no copy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from pegasus_dist.checksums import sha256_file
from pegasus_dist.data.manifest import Manifest, changed_shard
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.decoded")

ARRAY, INDEX, LOCK = "decoded.npy", "decoded.json", ".decoded.lock"
FORMAT = 1


@dataclass
class Decoded:
    images: np.ndarray  # (N, H, W, 3) uint8, mapped copy-on-write: the file is never written through it
    keys: list[str]
    labels: list[str | None]


def write_decoded(folder: Path, shard_sums: list[str], decoded: Decoded) -> None:
    """Write ``folder``'s array and index, decoded from the shards of ``shard_sums`` (sha256s); the
    index goes last, so a crash between leaves a pair that does not verify and is rebuilt."""
    images, keys, labels = np.ascontiguousarray(decoded.images), decoded.keys, decoded.labels
    index = {"format": FORMAT, "shape": list(images.shape), "shards": shard_sums, "keys": keys,
             "labels": labels, "sha256": _content_sha256(images, keys, labels)}
    _atomic_write(folder / ARRAY, lambda f: np.save(f, images, allow_pickle=False))
    _atomic_write(folder / INDEX, lambda f: f.write(json.dumps(index).encode()))


def open_decoded(manifest: Manifest, decode_all: Callable[[], Decoded]) -> Decoded | None:
    """The set's verified decoded array, built with ``decode_all`` (from the tars) when missing, stale
    or damaged; None when it cannot be written here (a read-only folder, a full disk). A shard that
    differs from its manifest's sha256, or a set too large to build in memory, raises DataError."""
    if (found := built_decoded(manifest)) is not None:
        return found
    folder = manifest.path
    try:
        with FileLock(folder / LOCK, thread_local=False, preserve_lock_file=True):
            found, problem = verified_decoded(manifest)  # another rank may have built it meanwhile
            if found is None:
                log.log(logging.INFO if problem is None else logging.WARNING, "decoding %s into %s once%s",
                        folder, ARRAY, "" if problem is None else f" ({problem})")
                write_decoded(folder, [s.sha256 for s in manifest.shards], decode_all())
                found, problem = verified_decoded(manifest)
    except OSError as err:
        log.warning("cannot write the decoded array of %s (%s); reading the tars instead",
                    folder, err.strerror or err)
        return None
    except MemoryError as err:  # the build holds the whole set at once
        megabytes = manifest.num_samples * 3 * manifest.image_size**2 / 2**20
        reason = str(err).splitlines()[0] if str(err) else "MemoryError"
        raise DataError(f"out of memory decoding {folder} into {ARRAY}, {megabytes:.0f} MB at once "
                        f"({reason}); set data.mode=stream data.decoded=false to read its tars batch "
                        "by batch") from None
    if found is None:
        raise DataError(f"{folder / ARRAY} does not verify right after it was written ({problem}); "
                        "check the disk, then delete it and run again")
    return found


def built_decoded(manifest: Manifest) -> Decoded | None:
    """The set's decoded array if a run built it and it still verifies; None otherwise (nothing is
    built here). A shard that differs from its manifest's sha256 raises DataError naming it."""
    for entry, path in zip(manifest.shards, manifest.shard_paths, strict=True):
        if sha256_file(path) != entry.sha256:
            raise DataError(changed_shard(path))
    return verified_decoded(manifest)[0]


def verified_decoded(manifest: Manifest) -> tuple[Decoded | None, str | None]:
    """(the array, None) when it verifies, else (None, why it would not be used as it is); why is
    None when neither file is (never built: the next training run builds it)."""
    array, index_path = manifest.path / ARRAY, manifest.path / INDEX
    if not index_path.exists() and not array.exists():
        return None, None
    try:
        index = json.loads(index_path.read_bytes())
        images = np.load(array, mmap_mode="c", allow_pickle=False)
        keys, labels = index["keys"], index["labels"]
        expected = [manifest.num_samples, manifest.image_size, manifest.image_size, 3]
        if index["format"] != FORMAT or index["shards"] != [s.sha256 for s in manifest.shards]:
            return None, f"{index_path} was decoded from other shards than {manifest.path}'s manifest lists"
        if list(images.shape) != expected or images.dtype != np.uint8:
            return None, f"{array} holds {images.dtype} {list(images.shape)}, not uint8 {expected}"
        if not len(keys) == len(labels) == manifest.num_samples:
            return None, (f"{index_path} lists {len(keys)} keys and {len(labels)} labels, not "
                          f"{manifest.num_samples}")
        if _content_sha256(images, keys, labels) != index["sha256"]:
            return None, f"{array} or {index_path} changed after they were written (sha256 differs)"
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:  # np.load: EOFError when empty
        # A missing half, a truncated array, a damaged header or index: all rebuilt.
        return None, f"{array} or {index_path} is unreadable ({err})"
    return Decoded(images, keys, labels), None


def _content_sha256(images: np.ndarray, keys: list[str], labels: list[str | None]) -> str:
    digest = hashlib.sha256(images.reshape(-1))  # a uint8 view: hashed where it lies
    digest.update(json.dumps([keys, labels]).encode())
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

