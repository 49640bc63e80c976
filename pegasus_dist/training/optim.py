"""The optimizer and what keeps it stable from one GPU to many nodes.

The learning rate follows the global batch by ``optim.lr_scaling``: sqrt by default (Malladi et al. 2022, for
adaptive optimizers); linear (Goyal et al. 2017, for SGD) makes Adam diverge at a global batch of 1024
(docs/scaling.md). :class:`DivergenceGuard` stops a run exploding in the warm-up, before its first checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from pegasus_dist.config import OptimConfig
from pegasus_dist.training.faults import TrainingError
from pegasus_dist.training.state import TrainState
from pegasus_dist.training.window import Window, reduce_windows

log = logging.getLogger("pegasus_dist.training.optim")

# "Orders of magnitude": a loss (or KL) 100 times the first step's loss. Healthy training of the paper model
# moves it by about 15 % in its first 30 steps (2410 -> 2065 at batch 128 on CIFAR-10); the diverging linear
# rule reached 170 and 6e6 times its first loss in one step at global batches 1024 and 4096 (docs/scaling.md).
DIVERGENCE_FACTOR = 100.0
# Steps watched when the warm-up is shorter (or off): the linear rule diverged in 1-3 steps.
GUARDED_STEPS = 100


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate for ``global_batch``, following ``optim.lr_scaling``."""
    ratio = global_batch / optim.base_batch_size
    return optim.lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[optim.lr_scaling]


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate of every optimizer step: a linear warm-up to the scaled rate, then
    ``optim.decay`` over the phase's epochs."""

    optim: OptimConfig
    global_batch: int
    epochs: int = 1  # of the phase

    @property
    def peak(self) -> float:
        return scaled_lr(self.optim, self.global_batch)

    def at(self, step: int, epoch: int = 0) -> float:
        """The rate of the optimizer step taken after ``step`` steps (0 for the first), in ``epoch``
        (from 0). The decay follows epochs, not steps, so that it is the same on any process count."""
        warmup = self.optim.warmup_steps
        rate = self.peak * min(1.0, (step + 1) / warmup) if warmup else self.peak
        if self.optim.decay == "none":
            return rate
        floor = self.optim.min_lr_ratio
        return rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs)))

    def describe(self) -> str:
        """Where the rate comes from, e.g. ``lr 0.00283 = optim.lr 0.001 x sqrt(1024/128) ...``."""
        o = self.optim
        ratio = f"{self.global_batch}/{o.base_batch_size}"
        factor = {"linear": f" x {ratio}", "sqrt": f" x sqrt({ratio})", "none": ""}[o.lr_scaling]
        warmup = f"linear warm-up over {o.warmup_steps} steps" if o.warmup_steps else "no warm-up"
        decay = (f", cosine decay to {o.min_lr_ratio:g} x lr by epoch {self.epochs}"
                 if o.decay == "cosine" else "")
        return (f"lr {self.peak:.3g} = optim.lr {o.lr:.3g}{factor} (optim.lr_scaling={o.lr_scaling}, "
                f"global batch {self.global_batch}), {warmup}{decay}")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], schedule: LrSchedule,
                    device: torch.device) -> torch.optim.Adam:
    """Adam at the rate of the first step; the trainer sets the rate again before every step."""
    # fused: one kernel for all parameters, several times faster on the CPU too (`pegasus-dist bench`).
    return torch.optim.Adam(parameters, lr=schedule.at(0), betas=tuple(schedule.optim.betas),
                            weight_decay=schedule.optim.weight_decay, fused=device.type in ("cpu", "cuda"))


class DroppedUpdates:
    """Counts the updates fp16's GradScaler dropped after an overflow, without waiting for the device.
    A fused optimizer is stepped even on an overflow (GradScaler hands it ``found_inf`` and the kernel drops
    the update), so Accelerate's ``optimizer_step_was_skipped`` stays False; an unfused one is not stepped.
    Both count as steps asked for minus updates made (on the device)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.asked = 0
        self.made = torch.zeros((), device=device)
        # The torch optimizer inside Accelerate's wrapper: the one GradScaler steps.
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for a fused optimizer only
        self.made += 1 if found_inf is None else (found_inf == 0).to(self.made)

    def note_step(self) -> None:
        """Right before each ``optimizer.step()``."""
        self.asked += 1

    def take(self) -> int:
        """The updates dropped since the last call (one host read)."""
        dropped = self.asked - int(self.made.item())
        self.asked = 0
        self.made.zero_()
        return dropped


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_on_resume(optimizer: torch.optim.Optimizer, schedule: LrSchedule, state: TrainState,
                    checkpoint: Path) -> None:
    """Give an optimizer restored from ``checkpoint`` this run's hyperparameters, logging changes:
    else lowering ``optim.lr`` to get past a divergence would change the log but not the training."""
    optim, group = schedule.optim, optimizer.param_groups[0]
    # Its config.yaml is a mapping of sections: checkpoint.find_damage checked it before the resume.
    # What the restored optimizer holds comes before what that file says (the same, unless edited).
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text()).get("optim", {})
    saved |= {"betas": list(group["betas"]), "weight_decay": group["weight_decay"]}
    changes = {f"optim.{key}": (saved[key], value) for key, value in vars(optim).items()
               if key in saved and not _same(saved[key], value)}
    # The restored rate is the one of the checkpoint's last step.
    step, epoch = state.step, state.epoch
    last = schedule.at(step - 1, state.last_step_epoch)
    if step and not _same(group["lr"], last):
        changes[f"lr at step {step}"] = (f"{group['lr']:.3g}", f"{last:.3g}")
    for g in optimizer.param_groups:
        g.update(lr=schedule.at(step, epoch), betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if described := [f"{name} {old} -> {new}" for name, (old, new) in changes.items()]:
        log.warning("resuming from %s with this run's optimizer settings, not the checkpoint's: %s",
                    checkpoint, "; ".join(described))


def _same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b))
    return a == b


class DivergenceGuard:
    """Stops a run whose loss or KL grows 100-fold over the first step's during the warm-up
    (at least GUARDED_STEPS), checked at sync points and reduced over the ranks."""

    def __init__(self, schedule: LrSchedule, batch_description: str) -> None:
        self.schedule, self.batch_description = schedule, batch_description
        self.until = max(schedule.optim.warmup_steps, GUARDED_STEPS) + 1
        self.checked_through = 0
        self.first: Window | None = None  # the window after the first step: its sums on the device
        self.first_step = 0

    def note_step(self, window: Window, step: int) -> None:
        """After each optimizer step; keeps the first step's sums (no host read)."""
        if self.first is None:
            self.first, self.first_step = copy.deepcopy(window), step  # its sums copied on the device

    def check(self, accelerator: Accelerator, window: Window, state: TrainState) -> TrainingError | None:
        """The error to stop with, or None; returned, so that the trainer logs the window first."""
        step, lr = state.step, self.schedule.at(state.step - 1, state.last_step_epoch)
        if self.first is None or self.checked_through >= self.until:
            return None
        self.checked_through = step
        first, now = reduce_windows(accelerator, self.first, window)
        if not (first.images and now.images):
            return None
        reference, loss, kl = first.total / first.images, now.total / now.images, now.kl / now.images
        limit = DIVERGENCE_FACTOR * abs(reference)
        if loss > limit or kl > limit:
            return TrainingError(f"diverging: the loss went from {reference:.4g} at step {self.first_step} "
                                 f"to {loss:.4g} (KL {kl:.4g}) by step {step}, at lr "
                                 f"{lr:.3g}; {self.schedule.describe()}; "
                                 f"{self.batch_description}; use optim.lr_scaling=sqrt, a longer "
                                 "optim.warmup_steps or a lower optim.lr (a resumed run applies them)")
        return None
