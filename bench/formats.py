"""Which sample format the shards should hold, measured side by side (issue 13, item 5).

    OMP_NUM_THREADS=1 .venv/bin/python bench/formats.py [--images 2000] [--sizes 32 96]

For each image side and format, on the same images (a seeded sample of the real
CIFAR-10 JPEGs of ../shared/data when present, synthetic images otherwise,
upscaled bicubically as ``prepare`` does) and on one core:

- encode: images/s turning a uint8 array into the member's bytes (what ``prepare`` pays);
- decode: images/s turning the member's bytes back into the uint8 array;
- read: samples/s reading a shard's members, without decoding them;
- read + decode: images/s from a shard's bytes to a batch of arrays, tar reading
  included, the way a loader worker does it;
- bytes per image in a shard (tar headers, padding and the JSON member included);
- whether a person can open a sample with an image viewer.

Beside them, what one GPU consumes: the paper model's training FLOPs per
image (forward and backward, counted by PyTorch's FLOP counter), the images/s
of an H100 SXM at 15 % MFU of its 989.4 dense bf16 TFLOP/s, and the loader
workers (one core each) every format needs to keep up with it. Prints a
Markdown table and writes JSON (``bench/results/formats.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from webdataset.autodecode import imagehandler, npy_loads
from webdataset.tariterators import tarfile_samples
from webdataset.writer import imageencoder, numpy_dumps

from pegasus_dist.config import ModelConfig
from pegasus_dist.data.folders import read_image_folder
from pegasus_dist.data.sources import synthetic
from pegasus_dist.model.vae import VAE

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
H100_BF16_DENSE = 989.4e12  # FLOP/s, NVIDIA's H100 SXM datasheet (1,979 with 2:4 sparsity)
MFU = 0.15
BATCH = 128  # images a loader worker decodes into one batch
REPEATS = 3  # each timing is the best of this many passes: the machine is shared
META = json.dumps({"key": "cifar10-train-0000000", "label": "horse", "split": "train"}).encode()


@dataclass
class Format:
    name: str
    ext: str  # the tar member's extension, which tells webdataset how to decode it
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[list], np.ndarray]  # members -> (B, H, W, 3) uint8
    read: Callable[[Path], Iterator]  # a shard -> its image members, in order
    openable: bool  # an image viewer opens the member


@dataclass
class Result:
    size: int
    format: str
    encode_per_core: float  # images/s
    decode_per_core: float
    read_per_core: float  # the shard's members alone, without decoding
    read_decode_per_core: float
    bytes_per_image: float
    openable: bool
    gpu_images_per_s: float
    workers: int


def formats() -> list[Format]:
    """The library's two formats, decoded by webdataset's own handlers.

    The third, plain PNG through a hand-written codec and tar reader, was
    measured at commit 065b481 (``git checkout 065b481 -- bench pegasus_dist``)
    and deleted after: docs/performance.md, "Sample format".
    """
    pillow = imagehandler("rgb8")
    return [
        Format("PNG, Pillow (webdataset)", "png", lambda image: imageencoder(image, "png"),
               lambda members: np.stack([pillow(".png", m) for m in members]),
               lambda path: library_members(path, "png"), True),
        Format("uint8 .npy (webdataset)", "npy", numpy_dumps,
               lambda members: np.stack([npy_loads(m) for m in members]),
               lambda path: library_members(path, "npy"), False),
    ]


def library_members(path: Path, ext: str) -> Iterator[bytes]:
    """The ``ext`` members of a shard, through webdataset's tar reader and sample grouping."""
    for sample in tarfile_samples([{"url": str(path)}]):
        yield sample[ext]


def best_rate(count: int, work: Callable[[], object]) -> float:
    """Items per second of ``work`` (which handles ``count`` items), the best of REPEATS passes."""
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return count / min(seconds)


def write_shard(path: Path, fmt: Format, members: list[bytes]) -> None:
    """A shard of these members, each with its JSON, written by webdataset's TarWriter."""
    with wds.TarWriter(str(path), encoder=False, mtime=0, user="pegasus", group="pegasus") as writer:
        for i, data in enumerate(members):
            writer.write({"__key__": f"k{i:07d}", fmt.ext: data, "json": META})


def decode_all(fmt: Format, members: Iterable) -> None:
    """Members -> batches of BATCH uint8 arrays, as a loader worker builds them."""
    batch = []
    for member in members:
        batch.append(member)
        if len(batch) == BATCH:
            fmt.decode(batch)
            batch = []
    if batch:
        fmt.decode(batch)


def measure(fmt: Format, images: np.ndarray, gpu_rate: float, shard: Path) -> Result:
    members = [fmt.encode(image) for image in images]
    if not np.array_equal(fmt.decode(members), images):
        raise AssertionError(f"{fmt.name} does not round-trip")
    write_shard(shard, fmt, members)
    count = len(images)
    loader_rate = best_rate(count, lambda: decode_all(fmt, fmt.read(shard)))
    return Result(
        size=images.shape[1], format=fmt.name,
        encode_per_core=best_rate(count, lambda: [fmt.encode(image) for image in images]),
        decode_per_core=best_rate(count, lambda: decode_all(fmt, members)),
        read_per_core=best_rate(count, lambda: sum(1 for _ in fmt.read(shard))),
        read_decode_per_core=loader_rate, bytes_per_image=shard.stat().st_size / count,
        openable=fmt.openable, gpu_images_per_s=gpu_rate, workers=math.ceil(gpu_rate / loader_rate))


def training_flops(size: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one image through the paper model at ``size``."""
    model = VAE(ModelConfig(image_size=size))
    x = torch.rand(2, 3, size, size)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as both:
        out = model(x)
        (out.logits.sum() + out.mu.sum() + out.logvar.sum()).backward()
    return forward.get_total_flops() / len(x), both.get_total_flops() / len(x)


def load_images(count: int, size: int) -> tuple[np.ndarray, str]:
    """A seeded sample of ``count`` real CIFAR-10 images (else synthetic ones) at ``size``."""
    if REAL_CIFAR.is_file():
        source, origin = read_image_folder(REAL_CIFAR), str(REAL_CIFAR)
    else:
        source, origin = synthetic(count), "synthetic"
    pick = np.sort(np.random.default_rng(0).choice(len(source.images), count, replace=False))
    return upscale(source.images[pick], size), origin


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                     for im in images])


def table(results: list[Result], flops: dict[int, tuple[float, float]]) -> str:
    lines = ["| side | format | encode, per core | decode, per core | read, per core | "
             "read + decode, per core | bytes per image | a person can open it | H100 at 15 % MFU | "
             "workers to feed it |", "|---:|---|---:|---:|---:|---:|---:|:-:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r.size} | {r.format} | {r.encode_per_core:,.0f}/s | {r.decode_per_core:,.0f}/s | "
            f"{r.read_per_core:,.0f}/s | {r.read_decode_per_core:,.0f}/s | {r.bytes_per_image:,.0f} | "
            f"{'yes' if r.openable else 'no'} | {r.gpu_images_per_s:,.0f}/s | {r.workers} |")
    lines += ["", "| side | forward GFLOP an image | forward + backward | backward / forward |",
              "|---:|---:|---:|---:|"]
    for size, (forward, both) in flops.items():
        ratio = (both - forward) / forward
        lines.append(f"| {size} | {forward / 1e9:.3f} | {both / 1e9:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "formats.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every rate is per core
    base, origin = load_images(args.images, 32)
    flops = {size: training_flops(size) for size in args.sizes}
    results = []
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes:
            images = upscale(base, size)
            gpu_rate = MFU * H100_BF16_DENSE / flops[size][1]
            results += [measure(fmt, images, gpu_rate, Path(work) / f"{size}-{i}.tar")
                        for i, fmt in enumerate(formats())]
    print(f"{len(base)} images from {origin}, {os.cpu_count()} cores\n")
    print(table(results, flops))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": origin, "count": len(base),
                                    "flops": {str(s): f for s, f in flops.items()},
                                    "results": [asdict(r) for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
