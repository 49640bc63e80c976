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
from pathlib import Path

import numpy as np

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.manifest import ShardEntry, sha256_file, write_manifest
from pegasus_dist.data.shards import encode_png, write_shard
from pegasus_dist.data.sources import SourceImages, load_source
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.prepare")

FINETUNE_CLASSES = ("horse", "bird")
# Below this many images a worker pool costs more than it saves.
POOL_THRESHOLD = 2000
POOL_CHUNK = 1000  # images per pool task


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
    order = np.random.default_rng(cfg.seed).permutation(len(metas))
    num_eval = max(1, round(len(metas) * cfg.eval_fraction)) if cfg.eval_fraction else 0
    held_out, train = order[:num_eval], order[num_eval:]
    sets = {
        "mix": train,
        "horse_bird": np.array([i for i in train if metas[i]["label"] in FINETUNE_CLASSES],
                               dtype=np.int64),
        "eval": held_out,
    }
    pngs = _encode_all(images, order)
    provenance = {
        "seed": cfg.seed,
        "eval_fraction": cfg.eval_fraction,
        "command": command,
        "sources": [{"spec": spec, "name": s.name, "origin": s.origin, "num_images": len(s.labels)}
                    for spec, s in zip(cfg.sources, sources, strict=True)],
    }
    out = Path(cfg.out)
    written = {name: _write_set(out, name, idx, metas, pngs, cfg, provenance)
               for name, idx in sets.items()}
    seconds = time.perf_counter() - started
    log.info("prepared %d images in %.1fs (%.0f images/s): %s", len(metas), seconds,
             len(metas) / seconds, ", ".join(f"{n}={len(i)}" for n, i in sets.items()))
    return written


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


def _encode_all(images: np.ndarray, order: np.ndarray) -> dict[int, bytes]:
    """PNG bytes of every image, encoded in parallel when there are many.

    The forked workers inherit the images through the pool's initializer, so a
    task is a chunk of indices and its answer the PNG bytes: no image is pickled.
    """
    if len(order) < POOL_THRESHOLD:
        return {int(i): encode_png(images[i]) for i in order}
    chunks = np.array_split(order, -(-len(order) // POOL_CHUNK))
    with multiprocessing.get_context("fork").Pool(initializer=_share, initargs=(images,)) as pool:
        encoded = [png for pngs in pool.imap(_encode_chunk, chunks) for png in pngs]
    return {int(i): png for i, png in zip(order, encoded, strict=True)}


_shared: np.ndarray | None = None  # in a pool worker: every image, inherited by fork


def _share(images: np.ndarray) -> None:
    global _shared
    _shared = images


def _encode_chunk(indices: np.ndarray) -> list[bytes]:
    return [encode_png(_shared[i]) for i in indices]


def _write_set(out: Path, name: str, indices: np.ndarray, metas: list[dict],
               pngs: dict[int, bytes], cfg: PrepareConfig, provenance: dict) -> Path:
    final, tmp = out / name, out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, len(indices), cfg.shard_size)):
        chunk = indices[start : start + cfg.shard_size]
        path = tmp / f"shard-{number:06d}.tar"
        write_shard(path, [(metas[i]["key"], pngs[int(i)], metas[i]) for i in chunk])
        shards.append(ShardEntry(path.name, len(chunk), sha256_file(path), path.stat().st_size))
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
