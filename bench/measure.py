"""What the bench's row modules share: the row, the trainer's configuration, and how a rate is timed."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from pegasus_dist.config import Config, validated
from pegasus_dist.model.vae import VAE
from pegasus_dist.training.distributed import Hardware, slow_bf16_warning
from pegasus_dist.training.loop import Trainer

T = TypeVar("T")
BATCH = 128  # per process, in every loader row (the training rows take `bench --batch`)
WARMUP = 2  # untimed steps first: allocator, kernels, autotuning


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: float | None = None  # the value it is compared with, if any
    target: float | None = None  # the ratio (or value) the issue asks for
    why: str = ""  # what bounds it, printed when the target is missed
    at_most: bool = False  # the target is a ceiling (a time), not a floor

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.measured <= self.target if self.at_most else self.measured >= self.target

    @property
    def measured(self) -> float:
        return self.value / self.baseline if self.baseline else self.value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_precision(device: torch.device, hardware: Hardware | None = None) -> str:
    """The precision of the rows that time how fast the recipe trains on ``hardware`` (this machine's
    when None): bf16, unless the trainer's own check says bf16 has no fast kernels there (an AVX2 CPU:
    18 times fp32's step), where a user trains in fp32 (``no``), as the trainer's warning says to."""
    bf16 = validated(Config, {"train": {"mixed_precision": "bf16"}})
    return "no" if slow_bf16_warning(bf16, device, hardware or Hardware.here(device)) else "bf16"


def label(precision: str) -> str:
    """How a row names ``train.mixed_precision``: fp32 for ``no``."""
    return "fp32" if precision == "no" else precision


def train_config(shards: Path, runs: Path, precision: str, device: torch.device,
                 image_size: int = 32, batch: int = BATCH, base: Config | None = None,
                 **train: object) -> Config:
    """The trainer's config for a timing: ``base`` (the defaults, the paper model, when None) with the
    bench's settings over it; ``train`` adds train.* settings (compile, channels_last)."""
    name = "-".join([f"bench-{precision}-{image_size}", *(k for k, v in train.items() if v)])
    raw = base.model_dump() if base else {}
    for section, values in {
        "run": {"output_dir": str(runs), "name": name},
        "data": {"shards": str(shards), "batch_size": batch, "mode": "memory"},
        "model": {"image_size": image_size},
        "train": {"mixed_precision": precision, "cpu": device.type != "cuda",
                  "checkpoint_every": 0, "checkpoint_minutes": 0,  # no checkpoint inside a timing
                  **train},
        "wandb": {"mode": "disabled"},
    }.items():
        raw[section] = raw.get(section, {}) | values
    return validated(Config, raw)


def new_processes() -> multiprocessing.context.BaseContext:
    """Where each measurement gets a process of its own: multiprocessing's forkserver, which imports
    torch and the trainer once and forks every process from there, where "spawn" spent 2.4 CPU
    seconds on those imports in each (2-core EPYC). Not a fork of this process: that would share
    its CUDA state and its threads; the server never touches CUDA."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pegasus_dist.training.loop"])  # before it starts
    return context


def in_own_process(measure: Callable[..., T], *args: object) -> T:
    """``measure(*args)`` in a new Python process (:func:`new_processes`), which ends with it.

    Accelerate keeps one mixed precision per process (a second Accelerator
    asking for another raises ValueError) and has no public reset: each
    measured trainer therefore gets a process, as each run of a user does.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=new_processes()) as pool:
        return pool.submit(measure, *args).result()


def loop_alone(cfg: Config, steps: int, device: torch.device) -> float:
    """In its own process (:func:`in_own_process`): the trainer's rate for ``cfg``, images/s."""
    return loop_rate(Trainer(cfg), WARMUP, steps, device)


def loop_rate(trainer: Trainer, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second of the project's training loop (``Trainer.run_epochs``), after a warm-up."""
    if warmup:
        trainer.run_epochs(until_step=trainer.state.step + warmup)
    synchronize(device)
    started = time.perf_counter()
    trainer.run_epochs(until_step=trainer.state.step + steps)
    synchronize(device)
    return steps * trainer.schedule.global_batch / (time.perf_counter() - started)


def flops_per_image(cfg: Config) -> float:
    """Forward and backward FLOPs of one training image, counted by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = VAE(cfg.model)
    x = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        (out.logits.sum() + out.mu.sum() + out.logvar.sum()).backward()
    return counter.get_total_flops() / len(x)


def steps_per_second(step: Callable, batches: list, device: torch.device) -> float:
    """Calls of ``step`` per second over ``batches``, after WARMUP untimed ones."""
    for batch in batches[:WARMUP]:  # allocator, kernels
        step(batch)
    synchronize(device)
    started = time.perf_counter()
    for batch in batches[WARMUP:]:
        step(batch)
    synchronize(device)
    return (len(batches) - WARMUP) / (time.perf_counter() - started)
