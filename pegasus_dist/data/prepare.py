"""`pegasus-dist prepare`: image sources -> the mix, horse_bird and eval shard sets.

All sources are loaded at the target size and concatenated; a seeded
permutation then shuffles them together and sets aside ``eval_fraction`` of
them as the held-out ``eval`` set. The rest, in the shuffled order, is
written as ``mix`` (every image) and ``horse_bird`` (the labelled horses and
birds only, as in the paper's finetune phase). Each set is written into a
temporary folder and renamed into place when complete, so an interrupted run
never leaves a half-written set behind. Same inputs, same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.manifest import ShardEntry, sha256_file, write_manifest
from pegasus_dist.data.png import encode_png
from pegasus_dist.data.shards import write_shard
from pegasus_dist.data.sources import SourceImages, load_source
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.prepare")

FINETUNE_CLASSES = ("horse", "bird")
# Below this many images a worker pool costs more than it saves.
POOL_THRESHOLD = 2000


def prepare(cfg: PrepareConfig, command: str = "") -> dict[str, Path]:
    """Write ``mix/``, ``horse_bird/`` and ``eval/`` under ``cfg.out``; return their folders."""
    cfg.validate()
    started = time.perf_counter()
    sources = _unique_names([_load(spec, cfg) for spec in cfg.sources])
    images = np.concatenate([s.images for s in sources])
    metas = [
        {"key": f"{s.name}-{split}-{i:07d}", "source": s.name, "index": i, "label": label,
         "split": split}
        for s in sources for i, (label, split) in enumerate(zip(s.labels, s.splits, strict=True))
    ]
    sets = _split(metas, cfg)
    provenance = {
        "seed": cfg.seed,
        "eval_fraction": cfg.eval_fraction,
        "command": command,
        "sources": [{"spec": spec, "name": s.name, "origin": s.origin, "num_images": len(s.labels)}
                    for spec, s in zip(cfg.sources, sources, strict=True)],
    }
    out = Path(cfg.out)
    tasks = {name: _shard_tasks(out / f".tmp-{name}", idx, cfg.shard_size)
             for name, idx in sets.items()}
    entries = iter(_write_shards(images, metas, [t for ts in tasks.values() for t in ts]))
    written = {
        name: _publish_set(out, name, sets[name], metas, [next(entries) for _ in set_tasks],
                           cfg, provenance)
        for name, set_tasks in tasks.items()
    }
    seconds = time.perf_counter() - started
    log.info("prepared %d images in %.1fs (%.0f images/s): %s", len(metas), seconds,
             len(metas) / seconds, ", ".join(f"{n}={len(i)}" for n, i in sets.items()))
    return written


def _split(metas: list[dict], cfg: PrepareConfig) -> dict[str, np.ndarray]:
    """Row indices of each set, in their shuffled (seeded, cross-source) writing order."""
    order = np.random.default_rng(cfg.seed).permutation(len(metas))
    num_eval = max(1, round(len(metas) * cfg.eval_fraction)) if cfg.eval_fraction else 0
    held_out, train = order[:num_eval], order[num_eval:]
    finetune = np.array([i for i in train if metas[i]["label"] in FINETUNE_CLASSES], dtype=np.int64)
    return {"mix": train, "horse_bird": finetune, "eval": held_out}


def _shard_tasks(folder: Path, indices: np.ndarray, shard_size: int) -> list[ShardTask]:
    """An empty temporary folder for a set, and one task per shard of it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return [ShardTask(folder / f"shard-{number:06d}.tar", indices[start : start + shard_size])
            for number, start in enumerate(range(0, len(indices), shard_size))]


def _load(spec: str, cfg: PrepareConfig) -> SourceImages:
    started = time.perf_counter()
    source = load_source(spec, cfg.image_size, cfg.verify_checksums)
    if source.images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise DataError(f"source {spec} gave images of shape {source.images.shape[1:]}, "
                        f"not {cfg.image_size}x{cfg.image_size}x3")
    log.info("%s: %d images (%s) in %.1fs", spec, len(source.labels),
             ", ".join(f"{k}={v}" for k, v in sorted(Counter(source.splits).items())),
             time.perf_counter() - started)
    return source


def _unique_names(sources: list[SourceImages]) -> list[SourceImages]:
    """Keys start with the source name: two sources of one kind become name and name_2."""
    seen: Counter[str] = Counter()
    renamed = []
    for source in sources:
        seen[source.name] += 1
        suffix = f"_{seen[source.name]}" if seen[source.name] > 1 else ""
        renamed.append(dataclasses.replace(source, name=source.name + suffix))
    return renamed


@dataclass
class ShardTask:
    path: Path  # the tar to write
    indices: np.ndarray  # rows of the concatenated sources, in the order to write them


def _write_shards(images: np.ndarray, metas: list[dict], tasks: list[ShardTask]) -> list[ShardEntry]:
    """Encode and write every shard, on all cores when there are many images.

    Each task is a whole shard: PNG encoding, tar writing and hashing all run in
    the forked workers, which inherit the images and metadata through the
    pool's initializer, so no image is pickled and no PNG is held in memory.
    """
    _share(images, metas)
    if len(images) < POOL_THRESHOLD:
        return [_write_one(task) for task in tasks]
    with multiprocessing.get_context("fork").Pool(initializer=_share,
                                                  initargs=(images, metas)) as pool:
        return pool.map(_write_one, tasks, chunksize=1)


_shared: tuple[np.ndarray, list[dict]] | None = None  # images and metadata, inherited by fork


def _share(images: np.ndarray, metas: list[dict]) -> None:
    global _shared
    _shared = (images, metas)


def _write_one(task: ShardTask) -> ShardEntry:
    images, metas = _shared
    write_shard(task.path, [(metas[i]["key"], encode_png(images[i]), metas[i])
                            for i in task.indices])
    return ShardEntry(task.path.name, len(task.indices), sha256_file(task.path),
                      task.path.stat().st_size)


def _publish_set(out: Path, name: str, indices: np.ndarray, metas: list[dict],
                 shards: list[ShardEntry], cfg: PrepareConfig, provenance: dict) -> Path:
    """Write the set's manifest into its temporary folder and rename it into place."""
    final, tmp = out / name, out / f".tmp-{name}"
    counts = {
        field: dict(sorted(Counter(str(metas[i][field] or "unlabeled") for i in indices).items()))
        for field in ("source", "label", "split")
    }
    write_manifest(tmp, name, cfg.image_size, shards, counts, provenance)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log.info("%s: %d samples in %d shards -> %s", name, len(indices), len(shards), final)
    return final
