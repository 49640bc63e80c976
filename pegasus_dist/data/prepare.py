"""`pegasus-dist prepare`: image sources -> the mix, horse_bird and eval shard sets. A seeded permutation
of all sources sets aside ``eval_fraction`` as ``eval``; the rest is ``mix`` (every image) and ``horse_bird``
(labelled horses and birds), each with its decoded array. Same inputs, same bytes. The three sets are
published as one unit, one ``.current`` link to a ``.generation-*`` folder (README.md, "Fault tolerance"):
a held-out image of one run is never a training image of another."""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.pool
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.decoded import Decoded, write_decoded
from pegasus_dist.data.images import SourceImages
from pegasus_dist.data.manifest import SHARD_SETS, ShardEntry, generation_id, write_manifest
from pegasus_dist.data.shards import write_shard
from pegasus_dist.data.sources import load_source
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.prepare")

FINETUNE_CLASSES = ("horse", "bird")
POOL_THRESHOLD = 2000  # below this many images a worker pool costs more than it saves
CURRENT = ".current"  # the link to the published generation folder
GENERATION = ".generation-"  # the prefix of generation folders
LOCK = ".prepare.lock"  # held while a prepare writes into the folder (a flock: gone with its process)
TAR_OVERHEAD = 2048  # bytes a sample's tar takes beyond its pixels: 2 headers, the JSON, the padding


def prepare(cfg: PrepareConfig, command: str = "") -> dict[str, Path]:
    """Write ``mix/``, ``horse_bird/`` and ``eval/`` under ``cfg.out``; return their folders. The sources
    are read first; then one ``prepare`` at a time writes into ``--out``."""
    started = time.perf_counter()
    sources = _unique_names([_load(spec, cfg) for spec in cfg.sources])
    images = np.concatenate([s.images for s in sources])
    metas = [{"key": f"{s.name}-{split}-{i:07d}", "source": s.name, "index": i, "label": label,
              "split": split}
             for s in sources for i, (label, split) in enumerate(zip(s.labels, s.splits, strict=True))]
    sets = _split(metas, cfg)
    provenance = {"seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "command": command,
                  "sources": [{"spec": spec, "name": s.name, "origin": s.origin, "num_images": len(s.labels)}
                              for spec, s in zip(cfg.sources, sources, strict=True)]}
    out = Path(cfg.out)
    # About what the sets take on disk: each image in its tar and in the decoded array, and TAR_OVERHEAD.
    needed = sum(map(len, sets.values())) * (2 * cfg.image_size**2 * 3 + TAR_OVERHEAD)
    with _writing(out, needed) as generation:
        tasks = {name: _shard_tasks(generation / name, idx, cfg.shard_size) for name, idx in sets.items()}
        entries = iter(_write_shards(images, metas, [t for ts in tasks.values() for t in ts]))
        shards = {name: [next(entries) for _ in set_tasks] for name, set_tasks in tasks.items()}
        provenance["generation"] = generation_id(provenance, shards)
        for name, indices in sets.items():
            # write_manifest sorts every key: the counts need no order of their own.
            counts = {field: Counter(str(metas[i][field] or "unlabeled") for i in indices)
                      for field in ("source", "label", "split")}
            write_manifest(generation / name, name, cfg.image_size, shards[name], counts, provenance)
            write_decoded(generation / name, [s.sha256 for s in shards[name]], Decoded(
                images[indices], [metas[i]["key"] for i in indices], [metas[i]["label"] for i in indices]))
            log.info("%s: %d samples in %d shards", name, len(indices), len(shards[name]))
        _publish(out, generation, list(sets))
    seconds = time.perf_counter() - started
    log.info("prepared %d images in %.1fs (%.0f images/s): %s -> %s (generation %s)", len(metas),
             seconds, len(metas) / seconds, ", ".join(f"{n}={len(i)}" for n, i in sets.items()),
             out, provenance["generation"])
    return {name: out / name for name in sets}


@contextmanager
def _writing(out: Path, needed: int) -> Iterator[Path]:
    """Hold ``out``'s prepare lock, after removing what a crashed prepare left there, and give the new
    generation's folder, removed again if the prepare fails before publishing it. A second prepare,
    a full disk or a folder that cannot be written is one line naming the path."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with FileLock(out / LOCK, thread_local=False, preserve_lock_file=True).acquire(blocking=False):
            _remove_stale(out, keep=_published(out))
            generation = out / f"{GENERATION}{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
            try:
                yield generation
            except Exception:  # what a kill leaves behind, the next prepare removes first
                if _published(out) != generation:  # the commit point was not reached
                    shutil.rmtree(generation, ignore_errors=True)
                raise
    except Timeout:
        raise DataError(f"{out} is being written by another `pegasus-dist prepare`; wait for it to "
                        "end, or prepare into another --out") from None
    except OSError as err:
        raise DataError(_write_error(err, out, needed)) from None


def _write_error(err: OSError, out: Path, needed: int) -> str:
    """The line for a write under ``out`` that failed; when a file found no room (a full disk, a quota,
    a file size limit), with the space left there and the space the sets take."""
    where = f"cannot write {err.filename or out}: {err.strerror or err}"
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{where}; make {out} writable, or prepare into another --out"
    try:
        existing = next(path for path in (out, *out.parents) if path.is_dir())
        free = f"{shutil.disk_usage(existing).free / 2**20:.0f} MB free there, "
    except OSError:
        free = ""
    return (f"{where} ({free}these sets take about {needed / 2**20:.1f} MB); free space, "
            "or prepare into another --out")


def _split(metas: list[dict], cfg: PrepareConfig) -> dict[str, np.ndarray]:
    """Row indices of mix, horse_bird and eval, in their shuffled (seeded, cross-source) writing order."""
    order = np.random.default_rng(cfg.seed).permutation(len(metas))
    num_eval = max(1, round(len(metas) * cfg.eval_fraction)) if cfg.eval_fraction else 0
    held_out, train = order[:num_eval], order[num_eval:]
    finetune = np.array([i for i in train if metas[i]["label"] in FINETUNE_CLASSES], dtype=np.int64)
    return dict(zip(SHARD_SETS, (train, finetune, held_out), strict=True))


def _shard_tasks(folder: Path, indices: np.ndarray, shard_size: int) -> list[ShardTask]:
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


_shared: tuple[np.ndarray, list[dict]] | None = None  # images and metadata, inherited by fork


def _write_shards(images: np.ndarray, metas: list[dict], tasks: list[ShardTask]) -> list[ShardEntry]:
    """Encode and write every shard, on all cores when there are many images; forked workers
    inherit the images as a module global: nothing is pickled."""
    global _shared
    _shared = (images, metas)
    if len(images) < POOL_THRESHOLD:
        return [_write_one(task) for task in tasks]
    with shard_writers() as pool:
        entries = pool.map(_write_one, tasks, chunksize=1)
        pool.close()  # the workers end on their own; the with block's terminate is for errors
        pool.join()
    return entries


def shard_writers() -> multiprocessing.pool.Pool:
    """One forked worker per core, with the default signal handlers: a handler inherited from
    the caller (a "checkpoint and stop", in a notebook that trained first) would keep a worker alive
    through the SIGTERM of a pool stopped by an error, and the pool's exit would wait for it."""
    return multiprocessing.get_context("fork").Pool(initializer=_default_signal_handlers)


def _default_signal_handlers() -> None:
    for signum in signal.valid_signals():
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)


def _write_one(task: ShardTask) -> ShardEntry:
    images, metas = _shared
    write_shard(task.path, ((metas[i]["key"], images[i], metas[i]) for i in task.indices))
    return ShardEntry(name=task.path.name, num_samples=len(task.indices), sha256=sha256_file(task.path),
                      bytes=task.path.stat().st_size)


def _publish(out: Path, generation: Path, names: list[str]) -> None:
    """Make the sets in ``generation`` those of ``out`` at once: the commit point is one rename of
    a new ``.current`` link over the old. Set folders of the layout before generations are moved
    aside before any link is made: an interruption leaves old sets or new ones, never both."""
    _replace_link(out / CURRENT, Path(generation.name))
    for folder, aside in ((out / name, out / f".replaced-{name}") for name in names):
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
    for name in names:
        _replace_link(out / name, Path(CURRENT) / name)
    _remove_stale(out, keep=generation)


def _published(out: Path) -> Path | None:
    link = out / CURRENT
    return out / os.readlink(link) if link.is_symlink() else None


def _remove_stale(out: Path, keep: Path | None) -> None:
    """What earlier runs left in ``out``: generations other than ``keep`` (crashed, or replaced),
    half-made links, and the sets and temporary folders of the layout before generations."""
    old_layout = {f".tmp-{name}" for name in SHARD_SETS}
    for path in out.iterdir():
        stale = path.name.startswith((GENERATION, ".link-", ".replaced-")) or path.name in old_layout
        if not stale or path == keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _replace_link(path: Path, target: Path) -> None:
    """``path`` becomes a link to ``target`` (relative to its folder) in one atomic rename."""
    if path.is_symlink() and Path(os.readlink(path)) == target:
        return
    new = path.with_name(f".link-{path.name}")
    new.unlink(missing_ok=True)
    new.symlink_to(target)
    os.replace(new, path)
