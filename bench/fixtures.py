"""Fixture archives in the official formats, for the benchmark and the tests.

The library only reads these formats (pegasus_dist.data.official); writing them
is what a benchmark or a test needs when the real archives are out of reach.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from pegasus_dist.data.official import CIFAR_CLASSES

# The 60,000 real CIFAR-10 JPEGs (folder layout) beside a clone of the repository
# (README, "First run on real data"): the bench and some tests use them when present.
REAL_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def write_cifar10_archive(images: np.ndarray, labels: list[int], path: Path) -> Path:
    """Write (N, 32, 32, 3) uint8 images in the official CIFAR-10 python layout.

    Five train batches and a test batch of about N/6 each, plus ``batches.meta``,
    as torchvision's ``CIFAR10`` reads them.
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
