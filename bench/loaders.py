"""The loader rows of the bench: both data paths against torchvision's CIFAR10 loader, and
the device-resident start-up (one process, two at once, and decoding the tars)."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.measure import BATCH, Row, new_processes, synchronize
from pegasus_dist.data.loader import MemoryLoader, ShardLoader
from pegasus_dist.data.official import CIFAR_CLASSES


def loader_rows(work: Path, device: torch.device) -> list[Row]:
    mix, batch = work / "shards" / "mix", BATCH
    baseline = {w: epoch_rate(_torchvision_loader(work, batch, w), device) for w in (1, 2)}
    rows = []
    for workers in (1, 2):
        rate = epoch_rate(ShardLoader(mix, batch, 0, 1, workers, seed=0, image_size=32,
                                       pin_memory=device.type == "cuda"), device)
        rows.append(Row(f"loader: stream, {workers} worker(s)", rate, "images/s",
                        baseline[workers], 2.0,
                        "each worker slices the set's memory-mapped decoded array"))
    rate = epoch_rate(ShardLoader(mix, batch, 0, 1, 1, seed=0, image_size=32,
                                  pin_memory=device.type == "cuda", decoded=False), device)
    rows.append(Row("loader: stream, 1 worker(s), parsing the tars (data.decoded=false)",
                    rate, "images/s", baseline[1]))
    memory = MemoryLoader(mix, batch, 0, 1, seed=0, image_size=32, device=device)
    rate = epoch_rate(memory, device, epochs=20)  # an epoch takes milliseconds
    rows.append(Row("loader: device-resident", rate, "images/s", baseline[2], 50.0,
                    "one index_select per batch, bound by memory bandwidth"))
    rows += [Row(f"loader: torchvision CIFAR10 baseline, {w} worker(s)", baseline[w], "images/s")
             for w in (1, 2)]
    return rows + _startup_rows(mix, device)


def _startup_rows(mix: Path, device: torch.device) -> list[Row]:
    """Device-resident start-up per 100k images: one process, two at once (the ranks of a node),
    and decoding the tars as before the decoded array; each in new processes of one pool."""
    with ProcessPoolExecutor(max_workers=2, mp_context=new_processes()) as pool:
        # Both processes started, with torch and this module imported, untimed.
        list(pool.map(_settle, [0.5, 0.5]))
        one = _startup_seconds(pool, mix, device, processes=1)
        two = _startup_seconds(pool, mix, device, processes=2)
        tars = _startup_seconds(pool, mix, device, processes=1, decoded=False)
    return [
        Row("device-resident start-up, per 100k images", one, "s", None, 1.0,
            "each process hashes the tars and the decoded array it maps", at_most=True),
        Row("device-resident start-up, 2 processes at once vs 1, per 100k images", two, "s", one),
        Row("device-resident start-up, decoding the tars (data.decoded=false), per 100k images",
            tars, "s", one),
    ]


def _startup_seconds(pool: ProcessPoolExecutor, mix: Path, device: torch.device, processes: int,
                     decoded: bool = True) -> float:
    """Wall seconds per 100k images until ``processes`` processes of ``pool`` have each built a
    MemoryLoader (a new one: nothing of it is kept between calls)."""
    started = time.perf_counter()
    sizes = [pool.submit(_memory_loader_size, mix, str(device), decoded) for _ in range(processes)]
    num_samples = [size.result() for size in sizes][0]
    return (time.perf_counter() - started) / num_samples * 1e5


def _settle(seconds: float) -> None:
    time.sleep(seconds)


def _memory_loader_size(mix: Path, device: str, decoded: bool) -> int:
    return MemoryLoader(mix, BATCH, 0, 1, seed=0, image_size=32, device=device, decoded=decoded).num_samples


def epoch_rate(loader: Iterable, device: torch.device, epochs: int = 3) -> float:
    """Images per second delivered on ``device`` in the best of ``epochs`` whole epochs.

    The best, because on a shared 2-core machine the others measure the
    neighbours too; each epoch includes the loader's own start-up.
    """
    rates = []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        for batch in loader:
            images = batch.images if hasattr(batch, "images") else batch[0]
            images.to(device, non_blocking=True)
            seen += len(images)
        synchronize(device)
        rates.append(seen / (time.perf_counter() - started))
    return max(rates)


def _torchvision_loader(work: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """What a user would otherwise write: torchvision's CIFAR10 + ToTensor + DataLoader."""
    from torchvision.datasets import CIFAR10
    from torchvision.transforms import ToTensor

    class LocalCIFAR10(CIFAR10):  # the bench archive is not the official file: skip its md5
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = list(CIFAR_CLASSES)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    root = work / "torchvision"
    if not root.exists():
        with tarfile.open(work / "cifar-10-python.tar.gz") as tar:
            tar.extractall(root, filter="data")
    dataset = LocalCIFAR10(str(root), train=True, transform=ToTensor())
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
