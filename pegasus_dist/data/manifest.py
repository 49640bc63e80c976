"""``manifest.json``: what a shard set holds and how it was made. Image size, sample counts per source,
label and split, every shard with its count and sha256 (the loader plans epochs from them without
scanning the tars), and the provenance. The sets of one ``prepare`` share a ``generation``, a hash of
their provenance and shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pegasus_dist.config import field_problem
from pegasus_dist.errors import DataError

FILENAME = "manifest.json"
FORMAT = 1
SHARD_SETS = ("mix", "horse_bird", "eval")  # what `prepare` writes side by side
HELD_OUT = "eval"  # the set training never sees
REPREPARE = "re-run `pegasus-dist prepare`"  # the fix of a damaged shard set
PROVENANCE = ("seed", "eval_fraction", "command", "sources", "generation")
Count = Annotated[int, Field(ge=0)]


class _Fields(BaseModel):
    """The fields of ``manifest.json`` that are read, each of its type: strict, so "50" is no count."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ShardEntry(_Fields):
    name: str
    num_samples: Count
    sha256: str
    bytes: Count


@dataclass
class Manifest:
    path: Path  # the shard set folder
    name: str
    image_size: int
    num_samples: int
    shards: list[ShardEntry]
    counts: dict[str, dict[str, int]]
    provenance: dict[str, Any]  # seed, eval_fraction, command, sources, generation

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s.name for s in self.shards]

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    @property
    def shard_starts(self) -> np.ndarray:
        """Where each shard's samples start in the set's file order (its decoded array's rows)."""
        return np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)

    @property
    def generation(self) -> str | None:
        """The id shared by the sets of one ``prepare`` run; None in manifests written before it."""
        return self.provenance.get("generation")


class _SourceFields(_Fields, extra="allow"):  # name, num_images: recorded, never read
    spec: str
    origin: str | None


class _ManifestFile(_Fields, extra="allow"):  # format, and fields a later version may add
    name: str
    image_size: Annotated[int, Field(gt=0)]
    num_samples: Count
    counts: dict[str, dict[str, Count]]
    shards: list[ShardEntry]
    seed: int | None = None  # the provenance, absent from the oldest manifests
    eval_fraction: float | None = None
    command: str = ""
    sources: list[_SourceFields] = []
    generation: str | None = None


def changed_shard(path: Path) -> str:
    """The error of a shard whose bytes differ from its manifest's sha256."""
    return (f"shard {path} does not match the sha256 of its manifest (changed after `prepare` "
            "wrote it); run `pegasus-dist verify`, then re-run `pegasus-dist prepare`")


def generation_id(provenance: dict[str, Any], shards: dict[str, list[ShardEntry]]) -> str:
    """The generation of the sets ``shards`` (set name -> its shards) made as ``provenance`` says."""
    content = {"provenance": provenance,
               "sets": {name: [(s.name, s.sha256) for s in entries] for name, entries in shards.items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(folder: Path, name: str, image_size: int, shards: list[ShardEntry],
                   counts: dict[str, dict[str, int]], provenance: dict[str, Any]) -> None:
    """Write ``folder/manifest.json``; sorted keys, so identical inputs give identical bytes."""
    data = {"format": FORMAT, "name": name, "image_size": image_size, "counts": counts,
            "num_samples": sum(s.num_samples for s in shards), "shards": [s.model_dump() for s in shards],
            **provenance}
    (folder / FILENAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check a shard set's manifest; every problem names the file and the fix."""
    folder = Path(folder)
    path = folder / FILENAME
    if not path.is_file():
        raise DataError(f"no shard set at {folder} (missing {FILENAME}); run "
                        f"`pegasus-dist prepare --out {folder.parent}` or fix data.shards/shard_set")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a bad encoding is a ValueError too
        raise DataError(f"{path} is not a valid manifest ({err}); {REPREPARE}") from None
    try:
        fields = _ManifestFile.model_validate(data)
    except ValidationError as err:
        raise DataError(f"{field_problem(path, err, _ManifestFile)}; {REPREPARE}") from None
    manifest = Manifest(folder, fields.name, fields.image_size, fields.num_samples, fields.shards,
                        fields.counts, provenance={k: data[k] for k in PROVENANCE if k in data})
    if sum(manifest.shard_sizes) != manifest.num_samples:
        raise DataError(f"{path} says num_samples {manifest.num_samples} but its shards list "
                        f"{sum(manifest.shard_sizes)}; re-run `pegasus-dist prepare`")
    if manifest.num_samples == 0:
        raise DataError(f"shard set {folder} is empty (0 samples); prepare it from sources that "
                        "hold images of this set (horse_bird needs labelled horses and birds)")
    for shard in manifest.shard_paths:
        if not shard.is_file():
            raise DataError(f"shard {shard} listed in {path} is missing; {REPREPARE}")
    return manifest
