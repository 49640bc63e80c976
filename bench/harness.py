"""`pegasus-dist bench`: throughput measured side by side with a baseline.

One run measures, on the same images (the real CIFAR-10 JPEGs beside the
repository when present, synthetic ones otherwise), on the GPU when there
is one:

- ``prepare`` from an archive in the official CIFAR-10 python format;
- the best of a few whole epochs of each loader: streaming shards with 1 and
  2 workers, the device-resident mode, and the baseline a user would
  otherwise write (torchvision's ``CIFAR10`` on the same images,
  ``ToTensor``, a ``DataLoader`` with the same workers);
- the project's training loop against a bare PyTorch loop written here
  (same model, batch and precision, batches already in memory), in fp32 and
  bf16, the FLOPs it achieves, and the paper's whole recipe extrapolated
  from one measured epoch;
- the trainer eager, with channels_last and (opt-in) torch.compile, and
  on the CPU what each achieves of the CPU's peak (bench/efficiency.py);
- 1 process against 2 gloo processes through ``accelerate launch``;
- how prepare, streaming, the device-resident start-up and training scale
  with the image side (32, 64, 96).

The whole epoch, the efficiency rows and the scaling rows train in bf16, the
recipe's precision, except where bf16 has no fast kernels (an AVX2 CPU,
:func:`bench.measure.fast_precision`): there in fp32, as a user would.

Each row with a target is reported as measured/target. The tests check that
the harness runs and reports; no test asserts a speed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.efficiency import efficiency_rows
from bench.fixtures import REAL_CIFAR, write_cifar10_archive
from bench.loaders import epoch_rate, loader_rows
from bench.measure import (
    BATCH,
    WARMUP,
    Row,
    fast_precision,
    flops_per_image,
    in_own_process,
    label,
    loop_alone,
    loop_rate,
    steps_per_second,
    train_config,
)
from pegasus_dist.config import Config, PrepareConfig
from pegasus_dist.data.folders import read_image_folder
from pegasus_dist.data.loader import MemoryLoader, ShardLoader
from pegasus_dist.data.official import CIFAR_CLASSES
from pegasus_dist.data.prepare import prepare
from pegasus_dist.data.sources import synthetic
from pegasus_dist.model.loss import kl_to_standard_normal
from pegasus_dist.model.vae import VAE
from pegasus_dist.training.loop import Trainer

log = logging.getLogger("bench.harness")
REPO = Path(__file__).resolve().parents[1]
# The paper's recipe: 100 epochs of CIFAR-10 (60,000 images) + STL-10 (113,000: train,
# test and unlabeled), then 300 epochs of their labelled horses and birds (2 x 6,000
# in CIFAR-10, 2 x 1,300 in STL-10).
PAPER_RECIPE_IMAGES = 100 * 173_000 + 300 * 14_600
SCALING_IMAGES = 2000


def run_bench(images: int, steps: int, out: Path, sizes: list[int], images_from: str,
              process_steps: int, compile_rows: bool, rounds: int, batch: int) -> list[Row]:
    """Measure every row, write ``out`` (JSON) and return the rows.

    ``images_from`` is ``auto`` (the real CIFAR-10 JPEGs beside the repository
    when present, else synthetic), ``synthetic`` or an image folder or
    tarball; ``sizes`` are the image sides of the scaling rows;
    ``process_steps`` the steps of each 1- and 2-process run; ``compile_rows``
    adds the torch.compile variants to the efficiency rows (bench/efficiency.py); ``rounds``
    is how often each comparison's loops are timed in turn (the best of each kept); ``batch``
    the per-process batch of the training rows (the loader rows decode batches of ``BATCH``).
    """
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pixels, labels, origin = _images(images, images_from)
        log.info("bench images: %d from %s on %s", len(pixels), origin, device)
        rows += _prepare_rows(pixels, labels, work)
        rows += loader_rows(work, device)
        fast = fast_precision(device)
        rows += _trainer_rows(work, steps, device, rounds, batch, fast)
        rows += efficiency_rows(work, steps, device, compile_rows, rounds, batch, fast)
        rows += _process_rows(work, process_steps)
        rows += _scaling_rows(pixels, labels, work, sizes, max(2, steps // 4), device, batch, fast)
    _write(rows, out, origin, device)
    return rows


def _images(count: int, images_from: str) -> tuple[np.ndarray, list[int], str]:
    if images_from == "auto":
        images_from = str(REAL_CIFAR) if REAL_CIFAR.is_file() else "synthetic"
    source = synthetic(count) if images_from == "synthetic" else read_image_folder(images_from)
    classes = {name: i for i, name in enumerate(CIFAR_CLASSES)} | {"car": 1}
    # A seeded sample of every class: the folder lists images class by class.
    pick = np.sort(np.random.default_rng(0).choice(len(source.labels), min(count, len(source.labels)),
                                                   replace=False))
    labels = [classes.get(source.labels[i] or "", 0) for i in pick]
    return source.images[pick], labels, images_from


def _prepare_rows(pixels: np.ndarray, labels: list[int], work: Path) -> list[Row]:
    archive = write_cifar10_archive(pixels, labels, work / "cifar-10-python.tar.gz")
    per_core = _prepare_per_core(archive, len(pixels), work / "shards", 32, shard_size=2000)
    return [Row("prepare from the CIFAR-10 archive, per core", per_core, "images/s", None, 5000,
                "un-gzipping and unpickling the archive runs on one core before the pool "
                "writes shards on all of them")]


def _prepare_per_core(archive: Path, count: int, out: Path, image_size: int, shard_size: int) -> float:
    """Images per second and core of ``prepare`` from ``archive`` (``count`` images) into ``out``."""
    started = time.perf_counter()
    prepare(PrepareConfig(sources=[f"cifar10:{archive}"], out=str(out), image_size=image_size,
                          shard_size=shard_size, verify_checksums=False))
    return count / (time.perf_counter() - started) / (os.cpu_count() or 1)


def _trainer_rows(work: Path, steps: int, device: torch.device, rounds: int, batch: int,
                  fast: str) -> list[Row]:
    """The project's loop against a bare one in fp32 and bf16, and a whole epoch in ``fast``."""
    rows = []
    for precision in ("no", "bf16"):
        cfg = train_config(work / "shards", work / "runs", precision, device, batch=batch)
        rates = in_own_process(_loop_against_bare, cfg, steps, device, precision == fast, rounds)
        flops = flops_per_image(cfg)
        rows += [
            Row(f"trainer vs bare loop, paper model, {label(precision)}, batch {batch}", rates.project,
                "images/s", rates.bare, 0.95, "the loop's own work (noise, loss sums, progress "
                "bar) shows beside the device's at this model size"),
            Row(f"  achieved, {label(precision)}", rates.project * flops / 1e12, "TFLOP/s"),
        ]
        if rates.epoch:
            rows += _recipe_rows(rates.epoch, rates.epoch_images, device, precision)
    return rows + _adam_rows(device)


@dataclass(frozen=True)
class _LoopRates:
    """Images per second: the project's loop and the bare one (best of the rounds), a whole epoch."""

    project: float
    bare: float
    epoch: float  # 0 when not measured
    epoch_images: int


def _loop_against_bare(cfg: Config, steps: int, device: torch.device, whole_epoch: bool,
                       rounds: int) -> _LoopRates:
    """In its own process (:func:`in_own_process`): the trainer's phase for ``cfg`` against a bare loop."""
    trainer = Trainer(cfg)
    trainer.loader.set_epoch(0)
    batches = [b for _, b in zip(range(steps + WARMUP), trainer.loader, strict=False)]
    bare_step = _bare_step(cfg, device)
    # Rounds that alternate the two loops, and the best of each: a neighbour's
    # burst on a shared machine then slows both alike or neither.
    timed = [(loop_rate(trainer, WARMUP, steps, device),
              cfg.data.batch_size * steps_per_second(bare_step, batches, device)) for _ in range(rounds)]
    project, bare = (max(rates) for rates in zip(*timed, strict=True))
    epoch = loop_rate(trainer, 0, len(trainer.loader), device) if whole_epoch else 0.0
    return _LoopRates(project, bare, epoch, trainer.loader.num_samples)


def _adam_rows(device: torch.device) -> list[Row]:
    """The optimizer step alone for the paper model: fused (the trainer's) against foreach."""
    model = VAE(Config().model).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    rates = {}
    for fused in (False, True):
        optimizer = torch.optim.Adam(model.parameters(), fused=fused)
        rates[fused] = steps_per_second(lambda _, o=optimizer: o.step(), [None] * (WARMUP + 20),
                                         device)
    return [Row("Adam step, paper model: fused vs foreach (the default)", rates[True], "steps/s",
                rates[False])]


def _recipe_rows(rate: float, epoch_images: int, device: torch.device, precision: str) -> list[Row]:
    """A whole epoch's rate in ``precision`` (``train.mixed_precision``), and the paper's recipe
    extrapolated from it."""
    rows = [Row(f"  one whole epoch ({epoch_images:,} images), {label(precision)}", rate, "images/s"),
            Row(f"  paper recipe ({PAPER_RECIPE_IMAGES / 1e6:.1f}M image-steps) at that rate",
                PAPER_RECIPE_IMAGES / rate / 60, "minutes")]
    if device.type == "cuda":  # the aim on one H100: the recipe in under 10 minutes
        rows.append(Row("  rate the recipe needs in 10 minutes", rate, "images/s", None,
                        PAPER_RECIPE_IMAGES / 600, "see docs/performance.md"))
    return rows


def _bare_step(cfg: Config, device: torch.device) -> Callable:
    """The loop a user would write by hand: same model, Adam, BCE + KL, gradient clip."""
    torch.manual_seed(cfg.train.seed)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = VAE(cfg.model).to(device, memory_format=layout)
    # The trainer's fused Adam and clip, so that the ratio measures the loop, not the optimizer.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, fused=True)

    def step(batch) -> None:
        x = batch.images.to(device).contiguous(memory_format=layout).float().div_(255)  # as the trainer's
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=cfg.train.mixed_precision == "bf16"):
            out = model(x)
        recon = F.binary_cross_entropy_with_logits(out.logits.float(), x, reduction="sum") / len(x)
        loss = recon + kl_to_standard_normal(out.mu.float(), out.logvar.float()).mean()
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _process_rows(work: Path, steps: int) -> list[Row]:
    rates = {}
    for procs, launch in ((1, "cpu-1proc.yaml"), (2, "cpu-2proc-gloo.yaml")):
        runs = work / f"procs{procs}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / launch), str(REPO / "pegasus_dist" / "train.py"),
               "--config", str(REPO / "configs/smoke/pretrain.yaml"),
               f"data.shards={work / 'shards'}", f"run.output_dir={runs}", f"train.max_steps={steps}",
               f"train.log_every={max(1, steps // 3)}", "wandb.mode=disabled", "data.mode=memory"]
        # On the CPU even on a GPU machine: one GPU cannot host two NCCL ranks.
        env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (runs / "pretrain/metrics.jsonl").read_text().splitlines()]
        # The last training window: steady state, not start-up (eval rows carry no rate).
        rates[procs] = [r for r in rows if "pretrain/images_per_s" in r][-1]["pretrain/images_per_s"]
    return [Row("2 gloo processes vs 1 (smoke model, CPU)", rates[2], "images/s", rates[1])]


def _scaling_rows(pixels: np.ndarray, labels: list[int], work: Path, sizes: list[int],
                  steps: int, device: torch.device, batch: int, fast: str) -> list[Row]:
    """How each cost grows with the image side: the same images, upscaled by prepare."""
    count = min(len(pixels), SCALING_IMAGES)
    archive = write_cifar10_archive(pixels[:count], labels[:count], work / "scaling.tar.gz")
    rows = []
    for size in sizes:
        shards = work / f"scaling-{size}"
        rows.append(Row(f"image size {size}: prepare, per core",
                        _prepare_per_core(archive, count, shards, size, shard_size=500), "images/s"))
        stream = ShardLoader(shards / "mix", BATCH, 0, 1, 1, seed=0, image_size=size)
        rows.append(Row(f"image size {size}: stream, 1 worker", epoch_rate(stream, device), "images/s"))
        started = time.perf_counter()
        memory = MemoryLoader(shards / "mix", BATCH, 0, 1, seed=0, image_size=size, device=device)
        rows.append(Row(f"image size {size}: device-resident start-up, per 100k images",
                        (time.perf_counter() - started) / memory.num_samples * 1e5, "s"))
        cfg = train_config(shards, work / "runs", fast, device, image_size=size, batch=batch)
        rate = in_own_process(loop_alone, cfg, steps, device)
        flops = flops_per_image(cfg)
        rows.append(Row(f"image size {size}: trainer, {label(fast)}, {flops / 1e9:.2f} GFLOP an image",
                        rate, "images/s"))
    return rows


def _write(rows: list[Row], out: Path, origin: str, device: torch.device) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "images": origin,
        "rows": [asdict(r) | {"measured": r.measured, "met": r.met} for r in rows],
    }
    out.write_text(json.dumps(data, indent=2) + "\n")


def format_table(rows: list[Row]) -> str:
    """A Markdown table: value, baseline, measured ratio, target, met."""
    lines = ["| measurement | value | baseline | measured | target | met |",
             "|---|---:|---:|---:|---:|:-:|"]
    for r in rows:
        baseline = f"{_number(r.baseline)} {r.unit}" if r.baseline else ""
        measured = f"{r.measured:.2f}x" if r.baseline else ""
        target = (f"{r.target:g}x" if r.baseline else f"{r.target:,g}") if r.target else ""
        target = f"at most {target}" if r.at_most and target else target
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        lines.append(f"| {r.name} | {r.value:,.2f} {r.unit} | {baseline} | {measured} | "
                     f"{target} | {met} |")
    missed = [f"- {r.name.strip()}: not met: {r.why}" for r in rows if r.met is False]
    return "\n".join(lines + ([""] + missed if missed else []))


def _number(value: float) -> str:
    """Thousands as whole numbers (22,500 images/s), small values to 3 digits (0.467 TFLOP/s)."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"
