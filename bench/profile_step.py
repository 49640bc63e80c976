"""Where a training step's time goes, under torch.profiler (``python -m bench.profile_step``).

For each ``--batch`` (images per process): the bench's trainer of the paper model
(:func:`bench.measure.train_config`, the one `pegasus-dist bench` times; with ``--config``
that config's model, losses and optimizer, the bench setting the data, the precision and
no checkpoints), WARMUP untimed steps, ``--steps`` steps timed without the profiler, then
as many under it, all in one epoch of synthetic images. The loop's sync points (a host
read every ``train.log_every`` steps, 10 here, and one as each run of steps ends) are
part of what is measured, as in training. It prints one line a batch:

- kernels a step: the CUDA kernels the device ran (CUDA only);
- ops a step: the aten operators called from Python or autograd (those nested in another
  operator not counted again);
- host ms a step: the profiled wall time less the time the host spent in the CUDA
  runtime's synchronize and copy calls, where it waits for the device; on the CPU the
  whole wall time. The profiler adds its own cost to each operator: the wall time
  without it is printed beside;
- device ms a step: the summed durations of the kernels, copies and memsets (CUDA only).

Issue 22 expects, at 128 images per GPU, about 300 kernels and 3-5 ms of host time a step
against under 1 ms of H100 compute: a step bound by kernel launches. bench/gpu-check.sh
prints these lines at 128 and 1024 images per GPU.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from bench.measure import WARMUP, synchronize, train_config
from pegasus_dist.config import Config, PrepareConfig, load_config
from pegasus_dist.console import exit_on_user_error, setup_logging
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import ConfigError
from pegasus_dist.training.loop import Trainer

# The CUDA runtime's and driver's calls in which the host waits for the device.
WAITS = re.compile(r"Synchronize|Memcpy")
RUNTIME = {"cuda_runtime", "cuda_driver"}  # kineto's activity types of those calls
DEVICE_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}  # ... and of the device's own work
EVAL_FRACTION = PrepareConfig.model_fields["eval_fraction"].default  # held out of the training set


@dataclass(frozen=True)
class StepProfile:
    """One batch size's profile, per optimizer step."""

    batch: int
    steps: int
    device: str
    precision: str
    ops: float
    host_ms: float
    wall_ms: float  # without the profiler
    kernels: float | None = None  # CUDA only
    device_ms: float | None = None  # CUDA only

    def describe(self) -> str:
        counts = f"{self.ops:,.0f} ops/step"
        times = f"host {self.host_ms:.2f} ms/step"
        if self.kernels is None or self.device_ms is None:
            times += " (device ms only measured on CUDA)"
        else:
            counts = f"{self.kernels:,.0f} kernels/step, {counts}"
            times += f", device {self.device_ms:.2f} ms/step"
        return (f"batch {self.batch}: {counts}, {times}; {self.wall_ms:.2f} ms/step without the "
                f"profiler ({self.steps} steps, {self.device}, {self.precision})")


def profile_batches(batches: list[int], steps: int, device: torch.device, precision: str,
                    base: Config | None = None, shards: Path | None = None) -> list[StepProfile]:
    """Each batch size's profile, on ``shards`` or, when None, on synthetic images made for it."""
    image_size = base.model.image_size if base else 32
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if shards is None:
            shards = work / "shards"
            count = math.ceil(images_needed(max(batches), steps) / (1 - EVAL_FRACTION))
            prepare(PrepareConfig(sources=[f"synthetic:{count}"], out=str(shards), image_size=image_size))
        return [_profile_batch(train_config(shards, work / f"batch-{batch}", precision, device, image_size,
                                            batch, base), steps, device)
                for batch in batches]


def images_needed(batch: int, steps: int) -> int:
    """The warm-up, the timed and the profiled steps, and one batch more: all in one epoch."""
    return (WARMUP + 2 * steps + 1) * batch


def _profile_batch(cfg: Config, steps: int, device: torch.device) -> StepProfile:
    batch, shards = cfg.data.batch_size, cfg.data.shards
    trainer = Trainer(cfg)
    if trainer.loader.num_samples < (needed := images_needed(batch, steps)):
        raise ConfigError(f"{shards} holds {trainer.loader.num_samples} training images, fewer than the "
                          f"{needed} that {steps} steps at batch {batch} need in one epoch: prepare more "
                          "(pegasus-dist prepare --source synthetic:N), pass fewer --steps, or leave "
                          "--shards out")
    trainer.run_epochs(until_step=WARMUP)
    started = time.perf_counter()
    trainer.run_epochs(until_step=trainer.state.step + steps)
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        started = time.perf_counter()
        trainer.run_epochs(until_step=trainer.state.step + steps)
        synchronize(device)
        profiled_us = (time.perf_counter() - started) * 1e6
    events = profiler.events()
    found = StepProfile(batch, steps, device.type, cfg.train.mixed_precision,
                        ops=sum(map(_outermost_op, events)) / steps,
                        host_ms=(profiled_us - waits_us(events)) / 1e3 / steps, wall_ms=wall_ms)
    return with_device_work(found, events) if cuda else found


def _outermost_op(event: FunctionEvent) -> bool:
    """An aten operator on the host, called from Python or autograd, not from inside another."""
    if event.device_type != DeviceType.CPU or not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def waits_us(events: list[FunctionEvent]) -> float:
    """The microseconds the host spent in the CUDA calls that wait for the device (none on the CPU)."""
    return sum(e.time_range.elapsed_us() for e in events
               if e.activity_type in RUNTIME and WAITS.search(e.name))


def with_device_work(found: StepProfile, events: list[FunctionEvent]) -> StepProfile:
    """``found`` with the kernels and the device's busy time a step, from the profile's device events."""
    work = [e for e in events if e.activity_type in DEVICE_WORK]
    kernels = sum(e.activity_type == "kernel" for e in work)
    if not kernels:  # CUPTI off, or kineto naming its activities otherwise: say so, not "0 kernels"
        seen = sorted({str(e.activity_type) for e in events})
        raise RuntimeError(f"no CUDA kernel in the profile (activity types seen: {', '.join(seen)}): "
                           "is CUPTI available to torch.profiler on this machine?")
    busy_us = sum(e.time_range.elapsed_us() for e in work)
    return replace(found, kernels=kernels / found.steps, device_ms=busy_us / 1e3 / found.steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=_positive, action="append", help="images per process; repeat for "
                        "several (default: 128 and 1024)")
    parser.add_argument("--steps", type=_positive, default=20, help="steps timed, then as many profiled")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--config", type=Path, help="the YAML whose model, losses and optimizer to "
                        "profile (default: the paper model's, configs/pretrain.yaml)")
    parser.add_argument("--shards", type=Path, help="shards to train on (default: synthetic images, "
                        "as many as the largest batch needs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    return parser.parse_intermixed_args(argv)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    """Print one line a batch size (see the module's docstring)."""
    setup_logging()

    def run() -> None:
        args = parse_args(argv)
        base = load_config(args.config, args.overrides) if args.config or args.overrides else None
        for found in profile_batches(args.batch or [128, 1024], args.steps, torch.device(args.device),
                                     args.precision, base, args.shards):
            print(found.describe(), flush=True)

    exit_on_user_error(run)


if __name__ == "__main__":
    main()
