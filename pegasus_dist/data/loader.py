"""The training data path: exact, seeded, distributed reading of a shard set. Each epoch is planned from the
manifest alone, the same on every rank: a seeded order of the shards and of the samples in each gives one
global sequence S; S from position ``start`` on (past a resumed epoch's trained samples) is cut into global
batches of ``world_size * batch_size``; rank r takes the r-th slice of each (the last, shorter one split
evenly), loader worker w of K the rank's batches j with j % K == w. So one process of batch 2B sees at each
step what two of batch B see together, and a run may resume on another world size or batch size: it trains the
rest of S, nothing twice, nothing skipped."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import DataConfig
from pegasus_dist.data.decoded import Decoded
from pegasus_dist.data.manifest import Manifest, changed_shard
from pegasus_dist.data.shards import ShardSample, ShardSet
from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.loader")


class LoaderWorkerLost(RuntimeError):
    """A loader worker process died while this process read a batch from it (the OOM killer, a SIGKILL);
    torch's own word for the same death, from its SIGCHLD handler, is a RuntimeError too."""


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (b, 3, H, W)
    keys: list[str]
    labels: list[str | None]
    offset: int  # where this rank's slice starts inside the global batch
    skipped: int = 0  # bad samples replaced (data.on_bad_sample=skip)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so copies to the GPU can be asynchronous."""
        return Batch(self.images.pin_memory(), self.keys, self.labels, self.offset, self.skipped)


@dataclass
class BatchPlan:
    positions: np.ndarray  # indices into the epoch's global sequence
    offset: int


def global_sequence(manifest: Manifest, seed: int, epoch: int) -> np.ndarray:
    """Every sample's row in the set's file order (its decoded array's), in this epoch's order."""
    sizes, starts = manifest.shard_sizes, manifest.shard_starts
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    return np.concatenate([starts[s] + np.random.default_rng([seed, epoch, int(s)]).permutation(sizes[s])
                           for s in shard_order])


def global_batch_sizes(num_samples: int, world_size: int, batch_size: int, start: int = 0) -> list[int]:
    """Samples in each global batch of the epoch from position ``start`` on, in order; the last holds
    what is left, at least one per rank (less is folded into the one before)."""
    left = num_samples - start
    if left < world_size:
        held = (f"the shard set holds {num_samples} samples" if not start else
                f"{left} of the epoch's {num_samples} samples are left from position {start}")
        raise DataError(f"{held}, fewer than the {world_size} processes; "
                        "prepare more data or launch fewer processes")
    step = world_size * batch_size
    full, last = divmod(left, step)
    if last < world_size and full:  # too few (or none) to give every rank one: fold into the batch before
        full, last = full - 1, last + step
    return [step] * full + [last]


def rank_batches(num_samples: int, world_size: int, rank: int, batch_size: int,
                 start: int = 0) -> list[BatchPlan]:
    """The positions in the global sequence of each batch of ``rank``, from ``start`` on."""
    sizes = global_batch_sizes(num_samples, world_size, batch_size, start)
    plans = []
    for size in sizes[:-1]:
        plans.append(BatchPlan(np.arange(start + rank * batch_size, start + (rank + 1) * batch_size),
                               rank * batch_size))
        start += size
    # The last global batch, split evenly: the ranks' shares differ by at most one.
    base, extra = divmod(sizes[-1], world_size)
    offset = rank * base + min(rank, extra)
    size = base + (rank < extra)
    plans.append(BatchPlan(np.arange(start + offset, start + offset + size), offset))
    return plans


class _ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch, split over the DataLoader's workers."""

    def __init__(self, shard_set: ShardSet, batch_size: int, rank: int, world_size: int,
                 seed: int, skip_bad: bool, decoded: Decoded | None) -> None:
        self.shard_set, self.skip_bad, self.decoded = shard_set, skip_bad, decoded
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        # Persistent workers (no fork or start-up per epoch) read the epoch to plan, and the
        # position to start at, from shared memory that set_epoch writes.
        self._epoch_and_start = multiprocessing.RawArray("q", 2)

    def set_epoch(self, epoch: int, start_sample: int) -> None:
        self._epoch_and_start[:] = [epoch, start_sample]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start_sample = self._epoch_and_start
        order = global_sequence(self.shard_set.manifest, self.seed, epoch)
        plans = rank_batches(self.shard_set.manifest.num_samples, self.world_size, self.rank,
                             self.batch_size, start_sample)[worker::workers]
        if self.decoded is not None:  # rows of the decoded array: no tar member is parsed
            images, keys, labels = self.decoded.images, self.decoded.keys, self.decoded.labels
            for plan in plans:
                rows = order[plan.positions]
                yield Batch(_nchw(images[rows]), [keys[r] for r in rows], [labels[r] for r in rows],
                            plan.offset)
            return
        cache = _ShardCache(self.shard_set, self.skip_bad)
        for plan in plans:
            yield cache.batch(order[plan.positions], plan.offset)


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, H, W), by NumPy: torch's permute-copy starts threads a worker cannot spare."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


class _ShardCache:
    """A worker's batches from the tars: it holds the encoded samples of the shard being read."""

    def __init__(self, shard_set: ShardSet, skip_bad: bool) -> None:
        self.shard_set, self.skip_bad = shard_set, skip_bad
        self.starts = shard_set.manifest.shard_starts
        self.index: int | None = None
        self.samples: list[ShardSample] = []

    def batch(self, rows: np.ndarray, offset: int) -> Batch:
        """Sample by sample: a bad one stops the run, or its slot takes a good sample's copy, so
        the batch keeps its size and every rank takes the same steps with the same shapes."""
        found = [self._item(int(row)) for row in rows]
        good = [sample for sample in found if sample is not None]
        pool = good or [self._first_good()]
        filled = [s if s is not None else pool[i % len(pool)] for i, s in enumerate(found)]
        keys, images, labels = zip(*filled, strict=True)
        return Batch(_nchw(np.stack(images)), list(keys), list(labels), offset, len(found) - len(good))

    def _item(self, row: int) -> tuple[str, np.ndarray, str | None] | None:
        """(key, image, label) of ``row`` of the set's file order, or None for a bad sample (one that
        does not decode, or was lost to a damaged shard) when bad ones are skipped."""
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        if shard != self.index:
            self.samples, self.index = self._read(shard), shard
        position = row - self.starts[shard]
        if position >= len(self.samples):  # lost to damage, which _read raised or (skipping) logged once
            return None
        sample = self.samples[position]
        try:
            return sample.key, self.shard_set.decode(sample), sample.meta["label"]
        except DataError as err:
            if not self.skip_bad:
                raise
            log.warning("skipping a bad sample: %s", err)
            return None

    def _first_good(self) -> tuple[str, np.ndarray, str | None]:
        """The first readable sample of the set, to stand in for a batch that is all bad."""
        for row in range(self.shard_set.manifest.num_samples):
            found = self._item(row)
            if found is not None:
                return found
        raise DataError(f"no sample of {self.shard_set.path} is readable; "
                        "run `pegasus-dist verify` and re-run `pegasus-dist prepare`")

    def _read(self, shard: int) -> list[ShardSample]:
        """The shard's samples; with bad ones skipped, those before a damage or a shortfall, and
        none of a shard changed since `prepare`: any of its samples may be the changed bytes."""
        samples: list[ShardSample] = []
        entry, path = self.shard_set.manifest.shards[shard], self.shard_set.manifest.shard_paths[shard]
        if self.skip_bad and sha256_file(path) != entry.sha256:  # hashed whole before any is used
            log.warning("%s; skipping all %d of its samples", changed_shard(path), entry.num_samples)
            return samples
        try:
            samples.extend(self.shard_set.read(shard, hashed=not self.skip_bad))  # skipping: hashed above
        except DataError as err:
            if not self.skip_bad or len(samples) > entry.num_samples:
                raise
            log.warning("%s; skipping its %d unread samples", err, entry.num_samples - len(samples))
        return samples


class ShardLoader:
    """This rank's batches of a shard set, one epoch per ``set_epoch`` + iteration."""

    def __init__(self, shard_set: str | Path, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, image_size: int, pin_memory: bool = False,
                 skip_bad_samples: bool = False, decoded: bool = True) -> None:
        """``decoded``: read the set's decoded array (built on first use) instead of its tars."""
        shards = ShardSet(shard_set, image_size)
        self.manifest, self.path, self.num_samples = shards.manifest, shards.path, shards.manifest.num_samples
        array = _decoded(shards, skip_bad_samples) if decoded else None
        self._dataset = _ShardStream(shards, batch_size, rank, world_size, seed, skip_bad_samples, array)
        self._num_batches = len(rank_batches(self.num_samples, world_size, rank, batch_size))
        self._loader = DataLoader(self._dataset, batch_size=None, num_workers=num_workers,
                                  pin_memory=pin_memory, persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Plan ``epoch``; iteration then starts at position ``start_sample`` of its order (resuming)."""
        self._dataset.set_epoch(epoch, start_sample)

    def __len__(self) -> int:
        """Batches of a whole epoch, the same on every rank."""
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self._loader
        except DataError as err:
            # A worker's error arrives wrapped in its traceback; keep the one-line message.
            raise DataError(str(err).rstrip().rsplit("DataError: ", 1)[-1]) from None
        except (ConnectionError, EOFError) as err:  # it died while this process fetched its batch's memory
            raise LoaderWorkerLost(f"DataLoader worker (pid unknown) ended while handing over a batch "
                                   f"({type(err).__name__}: {err})") from None


def _decoded(shards: ShardSet, skip_bad: bool) -> Decoded | None:
    """The set's decoded array; with bad samples skipped, a damaged shard is read from its tar."""
    try:
        return shards.decoded()
    except DataError as err:
        if not skip_bad:
            raise
        log.warning("%s; reading the tars and skipping bad samples", err)
        return None


class MemoryLoader:
    """The device-resident mode: the whole shard set decoded once into one uint8 tensor. Batches follow
    :class:`ShardLoader`'s plan; bad data stops this mode at load time. On the CPU the tensor is the
    mapped decoded array itself, which a node's ranks share through the page cache; a GPU gets one copy.
    A batch is NHWC rows seen as NCHW (channels-last)."""

    def __init__(self, shard_set: str | Path, batch_size: int, rank: int, world_size: int,
                 seed: int, image_size: int, device: torch.device | str = "cpu",
                 decoded: bool = True) -> None:
        """``decoded``: map the set's decoded array (built on first use) instead of decoding its tars."""
        shards = ShardSet(shard_set, image_size)
        self.manifest, self.path, self.num_samples = shards.manifest, shards.path, shards.manifest.num_samples
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = torch.device(device)
        found = (shards.decoded() if decoded else None) or shards.decode_all()
        # Object arrays: a batch's names are then one fancy index away.
        self.keys, self.labels = np.array(found.keys, dtype=object), np.array(found.labels, dtype=object)
        self.images = torch.from_numpy(found.images).to(self.device)  # N x H x W x 3
        self._num_batches = len(rank_batches(self.num_samples, world_size, rank, batch_size))
        self.epoch, self.start_sample = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Plan ``epoch``; iteration then starts at position ``start_sample`` of its order (resuming)."""
        self.epoch, self.start_sample = epoch, start_sample

    def __len__(self) -> int:
        """Batches of a whole epoch, the same on every rank."""
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        order = global_sequence(self.manifest, self.seed, self.epoch)  # sequence position -> tensor row
        on_device = torch.from_numpy(order).to(self.device)  # one copy per epoch
        for plan in rank_batches(self.num_samples, self.world_size, self.rank, self.batch_size,
                                 self.start_sample):
            start, stop = int(plan.positions[0]), int(plan.positions[-1]) + 1
            rows = order[start:stop]
            # index_select copies row by row, several times faster than images[index]
            images = torch.index_select(self.images, 0, on_device[start:stop]).permute(0, 3, 1, 2)
            yield Batch(images, self.keys[rows].tolist(), self.labels[rows].tolist(), plan.offset)


def make_loader(cfg: DataConfig, image_size: int, rank: int, world_size: int,
                device: torch.device) -> ShardLoader | MemoryLoader:
    """The loader ``data.mode`` asks for; ``auto`` keeps the set in memory when it fits."""
    shard_set = Path(cfg.shards) / cfg.shard_set
    manifest = ShardSet(shard_set, image_size).manifest
    megabytes = manifest.num_samples * 3 * image_size**2 / 2**20
    mode, why = cfg.mode, "as data.mode asks"
    if mode == "auto":
        fits = megabytes <= cfg.memory_limit_mb
        mode = "memory" if fits and cfg.on_bad_sample == "stop" else "stream"
        why = (f"{megabytes:.0f} MB {'<=' if fits else '>'} data.memory_limit_mb={cfg.memory_limit_mb}"
               + ("" if cfg.on_bad_sample == "stop" else ", and skipping bad samples needs streaming"))
    source = "the mapped decoded array" if cfg.decoded else "the tars, decoded"
    held = {"memory": f"held once on {device}, from {source}" + (
                ", shared by this node's ranks" if device.type == "cpu" and cfg.decoded else ""),
            "stream": f"read batch by batch from {source}"}[mode]
    log.info("data: %s mode for %s (%d images, %.0f MB decoded, %s): %s",
             mode, shard_set, manifest.num_samples, megabytes, held, why)
    if mode == "memory":
        return MemoryLoader(shard_set, cfg.batch_size, rank, world_size, cfg.seed, image_size, device,
                            decoded=cfg.decoded)
    return ShardLoader(shard_set, cfg.batch_size, rank, world_size, cfg.num_workers, cfg.seed,
                       image_size, pin_memory=device.type == "cuda",
                       skip_bad_samples=cfg.on_bad_sample == "skip", decoded=cfg.decoded)
